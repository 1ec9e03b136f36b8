"""`cgidm submit` end to end against `cgidm serve`, then `cgidm verify` on what it saved."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cgidm_testkit import tinymodels
from cgidm_testkit.processes import REPO_ROOT, child_env, free_port, wait_until
from tests.paths import SHARED_DATA, require_shared_data
from tests.service.test_import_boundaries import TORCH_FREE_CORE

pytestmark = pytest.mark.slow  # starts servers and processes

VANGOGH = SHARED_DATA / "wikiart-vangogh"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    for split in ("membership", "hold_out"):
        require_shared_data("wikiart-vangogh", split)
    root = tmp_path_factory.mktemp("submit")
    base = tinymodels.make_tiny_sd(root / "sd-base", seed=0)
    lora = tinymodels.make_lora(base, root / "lora", as_file=True, seed=7)
    registry = root / "models.json"
    registry.write_text(json.dumps({"models": [
        {"id": "sd-base", "family": "stable-diffusion", "path": str(base)}]}))
    images, controls = root / "images", root / "controls"
    for folder, source in ((images, "membership"), (controls, "hold_out")):
        folder.mkdir()
        for path in sorted((VANGOGH / source).glob("*.jpg"))[:2]:
            shutil.copy(path, folder / path.name)
    return {"root": root, "base": base, "lora": lora, "registry": registry,
            "images": images, "controls": controls}


@pytest.fixture(scope="module")
def serve(setup) -> Iterator[str]:
    port = free_port()
    env = child_env({"CGIDM_MODELS": str(setup["registry"])})
    log = (setup["root"] / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cgidm.cli", "serve", "--port", str(port),
                             "--data-dir", str(setup["root"] / "data")], env=env, cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 120,
                   "cgidm serve", proc, setup["root"] / "serve.log")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cgidm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cgidm.cli", *args], env=child_env({}),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_submit_uploads_waits_downloads_and_verifies(serve, setup):
    out = setup["root"] / "out"
    run = cgidm("submit", "--server", serve, "--pretrained", "sd-base", "--finetuned",
                str(setup["lora"]), "--prompt", "sks style", "--steps", "2", "--seed", "3",
                "--controls", str(setup["controls"]), "--out", str(out), str(setup["images"]))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "uploaded" in run.stderr and "sha256" in run.stderr
    assert "cgidm submit" in run.stderr  # the progress bar
    lines = run.stdout.splitlines()
    # cgidm check's table: the score column is the evidence score (one score everywhere), said
    # in the line above it, the similarity beside it
    assert lines[0].startswith("score = the evidence score the p-values and verdicts rest on")
    assert lines[1].split() == ["image", "score", "ssim", "p-value", "verdict"]
    assert "set test (one-sided Mann-Whitney U" in run.stdout
    result = json.loads((out / "result.json").read_text())
    names = [row["name"] for row in result["images"] + result["controls"]]
    assert len(names) == 4
    for name in names:
        for kind in ("recovered", "partial", "side_by_side"):
            assert (out / f"{name}.{kind}.png").read_bytes().startswith(b"\x89PNG")
    provenance = result["provenance"]
    assert provenance["models"]["finetuned"]["uploaded"] is True
    assert provenance["prompt"] == "sks style" and provenance["prompt_source"] == "given"
    assert "path" not in provenance["models"]["pretrained"]  # no operator paths in results
    assert all(item["of"] == "upload" for item in provenance["inputs"])

    verify = cgidm("verify", str(out / "result.json"), "--images", str(setup["images"]),
                   "--images", str(setup["controls"]), "--pretrained", str(setup["base"]),
                   "--finetuned", str(setup["lora"]))
    assert verify.returncode == 0, verify.stdout + verify.stderr[-3000:]
    assert "VERIFIED on cpu/float32" in verify.stdout

    tampered = setup["root"] / "tampered"
    shutil.copytree(setup["images"], tampered)
    victim = sorted(tampered.iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b"\x00")
    refused = cgidm("verify", str(out / "result.json"), "--images", str(tampered),
                    "--images", str(setup["controls"]), "--pretrained", str(setup["base"]),
                    "--finetuned", str(setup["lora"]))
    assert refused.returncode == 2 and "REFUSED" in refused.stdout and victim.name in \
        refused.stdout

    again = cgidm("submit", "--server", serve, "--pretrained", "sd-base", "--finetuned",
                  result["finetuned"], "--preset", "reference", "--steps", "2", "--out",
                  str(setup["root"] / "out2"), str(setup["images"]))  # the upload's id
    assert again.returncode == 0, again.stderr[-2000:]
    assert "uploaded" not in again.stderr
    config = json.loads((setup["root"] / "out2" / "result.json").read_text())["config"]
    assert config["steps"] == 2 and config["alpha"] == 2.0  # the reference preset, overridden
    assert config["common_random_numbers"] is False and config["bounded"] is False


@pytest.mark.parametrize("finetuned, code, words", [
    ("up-000000000000000000000000", 1, ["422", "unknown_model"]),
    ("model.ckpt", 1, ["415", "pickle_checkpoint"]),
])
def test_submit_failures_are_one_line(serve, setup, finetuned, code, words):
    if finetuned.endswith(".ckpt"):
        finetuned = str(setup["root"] / finetuned)
        Path(finetuned).write_bytes(b"\x80\x04" + bytes(64))
    run = cgidm("submit", "--server", serve, "--pretrained", "sd-base", "--finetuned",
                finetuned, "--out", str(setup["root"] / "never"), str(setup["images"]))
    assert run.returncode == code
    errors = [line for line in run.stderr.splitlines() if line.startswith("cgidm:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), run.stderr
    assert "Traceback" not in run.stderr


PROBE = """
import sys
from cgidm.cli import main
code = main(["submit", "--server", "http://127.0.0.1:{port}", "--pretrained", "b",
             "--finetuned", "f", "--out", "{out}", "{image}"])
core = {core}
print(code, "torch" in sys.modules,
      any(m.startswith("cgidm_core") and m not in core for m in sys.modules))
"""


def test_submit_runs_without_torch_and_says_when_the_server_is_down(setup):
    image = next(setup["images"].iterdir())
    probe = PROBE.format(port=free_port(), out=setup["root"] / "x", image=image,
                         core=repr(set(TORCH_FREE_CORE)))
    run = subprocess.run([sys.executable, "-c", probe], env=child_env({}), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["1", "False", "False"], run.stdout + run.stderr
    assert "cgidm: error: cannot reach the service" in run.stderr
