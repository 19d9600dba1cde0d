"""mergekit as an independent oracle: recipes through mergekit's own ``mergekit-yaml`` code path
(``MergeConfiguration`` validation and ``run_merge`` with the CLI's options: CPU, no lazy
unpickling, no model card, synchronous writes, random seed 0), all in ONE subprocess of this venv,
offline. mergekit's imports cost seconds of CPU: a process per recipe made the parity suites
import it two dozen times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

copy_tokenizer = sys.argv[2] == "1"
for config_path, out in json.loads(sys.argv[1]):
    text = open(config_path, encoding="utf-8").read()
    options = MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=copy_tokenizer, write_model_card=False,
                           async_write=False, quiet=True, random_seed=0)
    options.apply_global_options()
    try:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, options=options, config_source=text)
    except Exception as exc:
        raise SystemExit(f"mergekit failed on {config_path}: {type(exc).__name__}: {exc}")
"""


def run_mergekit(recipes: dict[str, str], root: Path, *, copy_tokenizer: bool = False, timeout_s: float = 600) -> dict[str, Path]:
    """Write each recipe under ``root`` and merge it with mergekit into ``root/<name>``."""
    jobs = []
    for name, text in recipes.items():
        config = root / f"{name}.yml"
        config.write_text(text)
        jobs.append((str(config), str(root / name)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(jobs), "1" if copy_tokenizer else "0"],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"mergekit failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return {name: root / name for name in recipes}
