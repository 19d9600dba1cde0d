"""The image demo on scikit-learn's digits: data, training, and the run on Ray."""
