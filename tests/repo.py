"""The repository root, defined once for the tests, and how they run its command-line entry points."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=300, env_overrides=None):
    """`python *args` in the repository root, output captured as text; env_overrides on top of os.environ."""
    env = {**os.environ, **env_overrides} if env_overrides else None
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
