"""Every command in the README runs somewhere: the test command in .ci/run, the rest here."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs():
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    subprocess.run([sys.executable, "-c", block], check=True, cwd=ROOT, capture_output=True)


def test_readme_main_job_runs(data_root):
    first = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0]
    # the install steps were done by whoever runs the tests; run the job itself
    job = first.split("&&")[-1].strip()
    env = {**os.environ, "SPADE_SC_DATA": str(data_root), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(job, shell=True, check=True, cwd=ROOT, capture_output=True, text=True, env=env)
    assert "her2st C2: 187 spots" in out.stdout


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "blocks[1]" in ci and "pytest collected no tests" in ci
    second = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[1]
    assert "pytest" in second
