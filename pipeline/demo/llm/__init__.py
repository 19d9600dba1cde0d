"""The language-model demo: a tiny Llama pretrained on text that ships with Python and its
packages, fine-tuned on Python source with several seeds, merged and evaluated on Ray."""
