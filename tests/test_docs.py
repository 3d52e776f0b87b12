"""The generated references match the code, and every relative link in README.md and docs/ points at a file."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_and_cli_references_are_up_to_date():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_relative_links_resolve():
    pages = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", name)
                                                 for name in os.listdir(os.path.join(ROOT, "docs"))
                                                 if name.endswith(".md")]
    broken = []
    for page in pages:
        text = open(page, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(os.path.dirname(page), target)):
                broken.append(f"{os.path.relpath(page, ROOT)} -> {target}")
    assert not broken, broken
