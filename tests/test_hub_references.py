"""Suspect models named by hub reference: parsing, fetching from local stand-ins of Hugging Face
and Civitai (``cgidm_testkit.hub_servers``, real HTTP on 127.0.0.1), and ``cgidm check`` on them.

No test reaches the internet: HF_ENDPOINT and CGIDM_CIVITAI_URL point at the local server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from cgidm.model_fetch import FetchConfig, ModelFetchError, fetch
from cgidm.model_refs import ModelReferenceError, looks_like_reference, parse_reference
from cgidm.registry import Registry, UnknownModel, load_registry
from cgidm_testkit.hub_servers import HubServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# ------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, canonical", [
    ("hf:alice/sks-lora", "hf:alice/sks-lora"),
    ("hf:alice/sks-lora@v1.0", "hf:alice/sks-lora@v1.0"),
    (f"hf:alice/sks-lora@{COMMIT}:lora/w.safetensors",
     f"hf:alice/sks-lora@{COMMIT}:lora/w.safetensors"),
    ("hf:alice/sks-lora:pytorch_lora_weights.safetensors",
     "hf:alice/sks-lora:pytorch_lora_weights.safetensors"),
    ("https://huggingface.co/alice/sks-lora", "hf:alice/sks-lora"),
    ("huggingface.co/alice/sks-lora/tree/dev", "hf:alice/sks-lora@dev"),
    ("https://huggingface.co/alice/sks-lora/blob/main/w.safetensors",
     "hf:alice/sks-lora@main:w.safetensors"),
    ("https://hf.co/alice/sks-lora/resolve/main/a/w.safetensors?download=true",
     "hf:alice/sks-lora@main:a/w.safetensors"),
    ("urn:air:sd1:lora:huggingface:alice/sks-lora", "hf:alice/sks-lora"),
    ("civitai:12345", "civitai:12345"),
    ("civitai:99@12345", "civitai:12345"),
    ("https://civitai.com/models/99/some-style?modelVersionId=12345", "civitai:12345"),
    ("https://civitai.com/api/download/models/12345", "civitai:12345"),
    ("urn:air:sdxl:lora:civitai:99@12345", "civitai:12345"),
    ("urn:air:sdxl:lora:civitai:99@12345.safetensors", "civitai:12345"),
])
def test_every_form_parses_to_one_reference(text, canonical):
    assert looks_like_reference(text)
    ref = parse_reference(text)
    assert ref.canonical == canonical and ref.given == text


def test_air_keeps_the_ecosystem_and_model_id():
    ref = parse_reference("urn:air:sdxl:lora:civitai:99@12345")
    assert (ref.ecosystem, ref.model_id, ref.version_id, ref.host) == \
        ("sdxl", 99, 12345, "civitai.com")
    assert parse_reference(f"hf:a/b@{COMMIT}").pinned and not parse_reference("hf:a/b").pinned


@pytest.mark.parametrize("text, words", [
    ("hf:alice", "OWNER/NAME"),
    ("hf:alice/b/c", "OWNER/NAME"),
    ("hf:alice/x@", "hf:"),
    ("hf:alice/x:../../etc/passwd", "file path"),
    ("hf:alice/x@..:w.safetensors", "revision"),
    ("civitai:", "names none"),
    ("civitai:abc", "not a number"),
    ("civitai:0", "does not exist"),
    ("https://civitai.com/models/99/some-style", "modelVersionId"),
    ("https://civitai.com/images/5", "model page"),
    ("https://huggingface.co/datasets/a/b", "dataset"),
    ("https://example.com/a/b", "huggingface.co or civitai.com"),
    ("ftp://huggingface.co/a/b", "not a model reference"),
    ("urn:air:sd1:lora:tensorart:5@6", "not supported"),
    ("urn:air:sd1", "AIR"),
    ("hf:a/\x01b", "control characters"),
    ("hf:a/b c", "OWNER/NAME"),
])
def test_malformed_references_say_what_is_wrong(text, words):
    with pytest.raises(ModelReferenceError, match=words) as err:
        parse_reference(text)
    assert "hf:OWNER/NAME" in str(err.value)  # the accepted forms are listed


def test_paths_and_registry_ids_are_not_references():
    for text in ("demo-vangogh", "./models/x.safetensors", "/abs/lora",
                 "up-0123456789abcdef01234567"):
        assert not looks_like_reference(text)


# ------------------------------------------------------------------------------------------
# the base table


def test_base_follows_from_the_hub_name_and_operators_extend_the_table(tmp_path):
    registry_file = tmp_path / "models.json"
    registry_file.write_text(json.dumps({
        "models": [{"id": "sd15", "family": "stable-diffusion", "path": "/m/sd15"},
                   {"id": "my-pony", "family": "stable-diffusion", "path": "/m/pony"}],
        "base_models": {"Pony": "my-pony"}}))
    registry = load_registry(registry_file)
    assert registry.base_for("SD 1.5").id == "sd15"
    assert registry.base_for("sd 1.5").id == "sd15"  # case does not matter
    assert registry.base_for("runwayml/stable-diffusion-v1-5").id == "sd15"
    assert registry.base_for("Pony").id == "my-pony"
    with pytest.raises(UnknownModel, match="not in the registry"):
        registry.base_for("SDXL 1.0")
    with pytest.raises(UnknownModel, match="base_models"):
        registry.base_for("Some Future Model")
    with pytest.raises(UnknownModel, match="does not record"):
        Registry([], "x").base_for(None)


# ------------------------------------------------------------------------------------------
# fetching from the local stand-ins


def _weights(values: int = 100_000) -> bytes:
    return save({"a.lora_A.weight": np.arange(values, dtype=np.float32)})


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def _config(hub: HubServer, tmp_path: Path, **kwargs) -> FetchConfig:
    return FetchConfig(cache_dir=tmp_path / "cache", civitai_url=hub.url, hf_endpoint=hub.url,
                       offline=False, **kwargs)


def _cached_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache").rglob("*") if p.is_file()
            and p.suffix in (".safetensors", ".part")]


def test_civitai_version_is_fetched_once_verified_and_resumed(hub, tmp_path):
    data = _weights()
    hub.add_civitai_file(7, _write(tmp_path / "s.safetensors", data), truncate="first",
                         trained_words=["sks style"], base_model="SD 1.5")
    fetched = fetch(parse_reference("https://civitai.com/models/1000?modelVersionId=7"),
                    _config(hub, tmp_path))
    assert fetched.path.read_bytes() == data and not fetched.from_cache
    assert (fetched.version_id, fetched.model_id, fetched.base_model, fetched.trained_words) == \
        (7, 1000, "SD 1.5", ["sks style"])
    ranges = [h.get("Range") for m, p, h in hub.requests if p.startswith("/files/")]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    again = fetch(parse_reference("civitai:7"), _config(hub, tmp_path))
    assert again.from_cache and again.path == fetched.path
    assert hub.downloads("/files/") == 2  # the cut one and its resumption: never a third
    offline = fetch(parse_reference("civitai:7"), FetchConfig(
        cache_dir=tmp_path / "cache", civitai_url="http://127.0.0.1:9", offline=True))
    assert offline.from_cache and offline.sha256 == fetched.sha256


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("setup, code", [
    ({"published_sha256": "ab" * 32}, "model_hash_mismatch"),
    ({"truncate": "always"}, "download_incomplete"),
    ({"token": "right"}, "model_access_denied"),
    ({"rate_limited": True}, "hub_rate_limited"),
])
def test_civitai_failures_are_clear_and_cache_nothing(hub, tmp_path, setup, code):
    hub.add_civitai_file(8, _write(tmp_path / "s.safetensors", _weights()), **setup)
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("civitai:8"), _config(hub, tmp_path))
    assert err.value.code == code, err.value
    assert _cached_files(tmp_path) == []


def test_civitai_token_is_sent_as_bearer_and_a_wrong_one_is_403(hub, tmp_path):
    hub.add_civitai_file(9, _write(tmp_path / "s.safetensors", _weights(10)), token="s3cret")
    with pytest.raises(ModelFetchError, match="403.*CGIDM_CIVITAI_TOKEN"):
        fetch(parse_reference("civitai:9"), _config(hub, tmp_path, civitai_token="wrong"))
    fetched = fetch(parse_reference("civitai:9"), _config(hub, tmp_path, civitai_token="s3cret"))
    assert fetched.size == len(_weights(10))
    with pytest.raises(ModelFetchError, match="404") as err:
        fetch(parse_reference("civitai:404"), _config(hub, tmp_path))
    assert err.value.code == "model_not_found"


def test_civitai_pickle_only_versions_are_refused(hub, tmp_path):
    hub.add_civitai_file(11, _write(tmp_path / "s.ckpt", b"\x80\x04" + bytes(40)))
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("civitai:11"), _config(hub, tmp_path))
    assert err.value.code == "pickle_checkpoint" and _cached_files(tmp_path) == []


def test_hf_file_is_pinned_to_the_commit_and_loads_offline(hub, tmp_path):
    data = _weights(50)
    old = "f" * 40
    hub.add_hf_repo("alice/sks-lora", {"pytorch_lora_weights.safetensors": data,
                                       "README.md": b"---\nbase_model: x/y\n---\n"},
                    commit=COMMIT, base_model="runwayml/stable-diffusion-v1-5",
                    history={old: {"pytorch_lora_weights.safetensors": _weights(7)}})
    fetched = fetch(parse_reference("https://huggingface.co/alice/sks-lora"),
                    _config(hub, tmp_path))
    assert fetched.revision == COMMIT and fetched.path.read_bytes() == data
    assert fetched.canonical == f"hf:alice/sks-lora@{COMMIT}:pytorch_lora_weights.safetensors"
    assert fetched.base_model == "runwayml/stable-diffusion-v1-5"
    resolved = [p for m, p, h in hub.requests if "/resolve/" in p]
    assert resolved and all(f"/resolve/{COMMIT}/" in p for p in resolved)  # never by branch
    pinned_old = fetch(parse_reference(f"hf:alice/sks-lora@{old}"), _config(hub, tmp_path))
    assert pinned_old.path.read_bytes() == _weights(7)
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("hf:alice/sks-lora:other.safetensors"), _config(hub, tmp_path))
    assert err.value.code == "model_not_found"
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("hf:bob/missing"), _config(hub, tmp_path))
    assert err.value.code == "model_not_found"
    before = len(hub.requests)
    offline = fetch(parse_reference("hf:alice/sks-lora@main"),
                    FetchConfig(cache_dir=tmp_path / "cache", hf_endpoint="http://127.0.0.1:9",
                                offline=True))
    assert offline.revision == COMMIT and offline.sha256 == fetched.sha256
    assert offline.base_model == "x/y"  # from the cached model card
    assert len(hub.requests) == before
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("hf:alice/never-fetched"),
              FetchConfig(cache_dir=tmp_path / "cache", offline=True))
    assert err.value.code == "model_not_cached"


def test_hf_into_a_content_addressed_store_downloads_once_and_checks_the_listed_hash(
        hub, tmp_path):
    """The worker's way (its disk cache is the store): keyed by the sha256 the Hub lists, no
    copy left in the HF cache, a file that is not the listed one refused."""
    from cgidm.model_fetch import plain_cache_store

    data = _weights(20)
    hub.add_hf_repo("alice/lora", {"w.safetensors": data})
    hub.add_hf_repo("alice/liar", {"w.safetensors": data},
                    listed_sha256={"w.safetensors": "ab" * 32})
    store = plain_cache_store(tmp_path / "store")
    first = fetch(parse_reference("hf:alice/lora"), _config(hub, tmp_path), store=store)
    assert first.path == tmp_path / "store" / "blobs" / f"{first.sha256}.safetensors"
    assert not first.from_cache and first.path.read_bytes() == data
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # no second copy
    downloads = hub.downloads("/alice/lora/resolve/")
    again = fetch(parse_reference("hf:alice/lora"), _config(hub, tmp_path), store=store)
    assert again.from_cache and hub.downloads("/alice/lora/resolve/") == downloads
    offline = FetchConfig(cache_dir=tmp_path / "cache", hf_endpoint="http://127.0.0.1:9",
                          offline=True)
    for text in ("hf:alice/lora", f"hf:alice/lora@{COMMIT}:w.safetensors"):
        cached = fetch(parse_reference(text), offline, store=store)  # no request at all
        assert cached.from_cache and cached.path == first.path and cached.revision == COMMIT
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("hf:alice/liar"), _config(hub, tmp_path), store=store)
    assert err.value.code == "model_hash_mismatch"
    assert sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file()
                  and p.suffix != ".lock") == [f"{first.sha256}.safetensors"]


def test_hf_pipeline_repo_is_a_snapshot_for_the_cli_and_refused_by_the_service(hub, tmp_path):
    hub.add_hf_repo("alice/full-ft", {
        "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.safetensors": _weights(5),
        "unet/diffusion_pytorch_model.bin": b"\x80\x04 a pickle",
    })
    fetched = fetch(parse_reference("hf:alice/full-ft"), _config(hub, tmp_path))
    assert fetched.path.is_dir() and fetched.revision == COMMIT and fetched.sha256 is None
    files = sorted(str(p.relative_to(fetched.path)) for p in fetched.path.rglob("*")
                   if p.is_file())
    assert files == ["model_index.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]  # never the pickle
    with pytest.raises(ModelFetchError, match="single .safetensors files") as err:
        fetch(parse_reference("hf:alice/full-ft"), _config(hub, tmp_path, allow_snapshot=False))
    assert err.value.code == "unsupported_model_file"


def test_hf_repos_with_several_weights_files_or_pickles_ask_for_one(hub, tmp_path):
    hub.add_hf_repo("alice/two", {"a.safetensors": _weights(3), "b.safetensors": _weights(4)})
    hub.add_hf_repo("alice/pickle", {"model.ckpt": b"\x80\x04" + bytes(10)})
    with pytest.raises(ModelFetchError, match="name one") as err:
        fetch(parse_reference("hf:alice/two"), _config(hub, tmp_path))
    assert err.value.code == "ambiguous_model_file"
    assert fetch(parse_reference("hf:alice/two:b.safetensors"), _config(hub, tmp_path)).size \
        == len(_weights(4))
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("hf:alice/pickle"), _config(hub, tmp_path))
    assert err.value.code == "pickle_checkpoint"
    with pytest.raises(ModelFetchError) as err:
        fetch(parse_reference("hf:alice/two:b.safetensors"),
              _config(hub, tmp_path, max_bytes=10))
    assert err.value.code == "file_too_large"


# ------------------------------------------------------------------------------------------
# `cgidm check` on hub references


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory, tiny_sd_pair) -> tuple[Path, Path]:
    """The session's tiny SD base and a LoRA file of it (diffusers' own save_lora_weights)."""
    from cgidm_testkit import tinymodels

    base = tiny_sd_pair[0]
    root = tmp_path_factory.mktemp("hub-sd")
    return base, tinymodels.make_lora(base, root / "lora", as_file=True, seed=1)


def _images(tmp_path: Path) -> list[str]:
    from PIL import Image

    paths = []
    for seed in (1, 2):
        pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        path = tmp_path / f"img{seed}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.slow  # two tiny Stable Diffusion checks
def test_cgidm_check_on_civitai_and_hf_references(sd_lora, hub, tmp_path, monkeypatch, capsys):
    from cgidm.cli import main

    base, lora = sd_lora
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [
        {"id": "sd15", "family": "stable-diffusion", "path": str(base)}]}))
    hub.add_civitai_file(42, lora, base_model="SD 1.5", trained_words=["sks style"])
    hub.add_hf_repo("alice/sks-lora", {"pytorch_lora_weights.safetensors": lora.read_bytes()},
                    base_model="runwayml/stable-diffusion-v1-5")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # as a user runs it: the reference asks for the fetch
    for name, value in {"CGIDM_MODELS": str(registry), "CGIDM_CIVITAI_URL": hub.url,
                        "HF_ENDPOINT": hub.url,
                        "CGIDM_MODEL_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    images = _images(tmp_path)
    common = ["--steps", "2", "--seed", "0", "--device", "cpu", *images]

    # no --pretrained, no --prompt: the version's baseModel and trained words supply them
    assert main(["check", "--finetuned", "urn:air:sd1:lora:civitai:1000@42",
                 "--out", str(tmp_path / "civitai"), *common]) == 0
    printed = capsys.readouterr().out
    assert "base: sd15" in printed and "'sks style'" in printed
    doc = json.loads((tmp_path / "civitai" / "results.json").read_text())
    assert doc["settings"]["finetuned"] == "urn:air:sd1:lora:civitai:1000@42"
    assert doc["settings"]["prompt"] == "sks style"
    source = doc["provenance"]["models"]["finetuned"]["hub"]
    assert (source["version_id"], source["sha256"], source["size"]) == \
        (42, __import__("hashlib").sha256(lora.read_bytes()).hexdigest(), lora.stat().st_size)
    assert source["pretrained_from"] == {"base_model": "SD 1.5", "registry_id": "sd15"}
    assert doc["provenance"]["models"]["finetuned"]["files"][0]["sha256"] == source["sha256"]

    # verify fetches the suspect again by its pinned version and re-runs the check
    monkeypatch.delenv("HF_HUB_OFFLINE")  # main() set it for its model loads
    record = str(tmp_path / "civitai" / "results.json")
    image_args = [arg for image in images for arg in ("--images", image)]
    assert main(["verify", record, *image_args, "--pretrained", str(base)]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    # ... and refuses when the hub now serves another file for that version
    other = tmp_path / "other.safetensors"
    other.write_bytes(_weights(33))
    hub.add_civitai_file(42, other, base_model="SD 1.5")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["verify", record, *image_args, "--pretrained", str(base)]) == 2
    assert "now serves something else for civitai:42" in capsys.readouterr().out

    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["check", "--finetuned", "https://huggingface.co/alice/sks-lora",
                 "--prompt", "sks", "--out", str(tmp_path / "hf"), *common]) == 0
    doc = json.loads((tmp_path / "hf" / "results.json").read_text())
    assert doc["provenance"]["models"]["finetuned"]["hub"]["revision"] == COMMIT
    capsys.readouterr()

    # cgidm eval takes the same reference (the fetched file, now from the cache)
    members, holdout = tmp_path / "members", tmp_path / "holdout"
    for folder, image in ((members, images[0]), (holdout, images[1])):
        folder.mkdir()
        shutil.copy(image, folder)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["eval", "--pretrained", str(base), "--finetuned", "hf:alice/sks-lora",
                 "--prompt", "sks", "--method", "loss", "--device", "cpu",
                 "--members", str(members), "--holdout", str(holdout),
                 "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["n_members"] == evaluated["n_holdout"] == 1
    assert evaluated["settings"]["finetuned_hub"]["revision"] == COMMIT

    # verify fetches an hf: suspect again by its pinned commit and re-runs the check
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["verify", str(tmp_path / "hf" / "results.json"), *image_args,
                 "--pretrained", str(base)]) == 0
    assert "VERIFIED" in capsys.readouterr().out

    # a published hash that is not the file's: refused, one line, exit 2, nothing cached
    hub.add_civitai_file(43, lora, published_sha256="00" * 32)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["check", "--pretrained", str(base), "--finetuned", "civitai:43",
                 "--out", str(tmp_path / "bad"), *common]) == 2
    assert "model_hash_mismatch" not in (err := capsys.readouterr().err) and "sha256" in err
    assert not (tmp_path / "bad").exists()
