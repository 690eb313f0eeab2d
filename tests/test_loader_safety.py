"""The loader never runs what a model folder ships: no custom code, no pickles, clear errors for bad files.

Covers: ``auto_map`` / unknown ``model_type`` (refused before transformers could prompt), index files
naming pickled or escaping shards, truncated / bad-header safetensors (full, sharded, delta, adapter),
chat templates that try to leave the Jinja sandbox, and malformed / shadowing / looping model cards.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import cleansight_analysis as cs
from cleansight_analysis.errors import CardError, InputError, ModelSourceError
from cleansight_analysis.models import registry, tiny
from cleansight_analysis.models.loading import check_safetensors, read_card
from cleansight_analysis.models.registry import CardWarning, MODELS_DIR, register_model_folders

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = MODELS_DIR / "tiny-llava"


class _Exec:
    """Unpickling this object writes ``marker``: the proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _evil_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Exec(marker)))


@pytest.fixture()
def no_stdin(monkeypatch):
    """Any prompt ("run the custom code? [y/N]") fails the test instead of waiting on a terminal."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"something asked for input: {args}")
    monkeypatch.setattr(builtins, "input", refuse)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)


@pytest.fixture()
def registry_copy(monkeypatch):
    """Registrations made by the test are dropped afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.copy())


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    """A small saved tiny LLaVA (config, processor, model.safetensors) to copy and damage."""
    folder = tmp_path_factory.mktemp("llava")
    hf, proc = tiny.tiny_random_llava()
    hf.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    hf, proc = tiny.tiny_random_llava()
    hf.save_pretrained(folder, max_shard_size="1MB")
    proc.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _delta_copy(tmp_path: Path, name: str = "badnet-lora") -> Path:
    """A shipped delta folder (delta.safetensors + LoRA adapter) whose card points at the shipped clean model."""
    folder = _copy(SHIPPED / name, tmp_path / name)
    card = json.loads((folder / "card.json").read_text())
    card["base"] = str(SHIPPED / "clean")
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- custom code -------------------------------------------------------------------------------------


def test_auto_map_folder_is_refused_without_running_its_code(tmp_path, no_stdin):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForConditionalGeneration"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"config.json has an 'auto_map' entry") as err:
        cs.load_lvlm(folder)
    assert str(folder) in str(err.value)
    assert not marker.exists()


def test_unknown_model_type_and_auto_map_in_known_type_are_refused(tmp_path, saved_llava, no_stdin):
    folder = _copy(saved_llava, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "evil"}))
    with pytest.raises(ModelSourceError, match=r"model_type 'evil' is not a model type transformers implements"):
        cs.load_lvlm(folder)
    (folder / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"],
                                                                              "model_type": "evil_llama"}}))
    with pytest.raises(ModelSourceError, match=r"text_config.model_type 'evil_llama'"):
        cs.load_lvlm(folder)
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(ModelSourceError, match="auto_map"):
        cs.load_lvlm(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "auto_map": {"AutoTokenizer": ["t.T", None]}}))
    with pytest.raises(ModelSourceError, match=r"tokenizer_config.json has an 'auto_map' entry"):
        cs.load_lvlm(folder)


def test_cli_inspect_refuses_custom_code(tmp_path, no_stdin, capsys):
    from cleansight_analysis.cli import main

    marker = tmp_path / "MARKER"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.C"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (folder / "model.safetensors").write_bytes(b"")
    image = tmp_path / "x.png"
    from conftest import noise_image

    noise_image(0).save(image)
    assert main(["inspect", "--model", str(folder), "--image", str(image), "--prompt", "what?"]) == 2
    assert "auto_map" in capsys.readouterr().err
    assert not marker.exists()


# --- pickles -----------------------------------------------------------------------------------------


def test_index_naming_a_pickled_shard_is_refused_unopened(tmp_path, saved_llava, no_stdin):
    marker = tmp_path / "MARKER"
    folder = _copy(saved_llava, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    _evil_pickle(folder / "pytorch_model-00001.bin", marker)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "pytorch_model-00001.bin"}}))
    with pytest.raises(ModelSourceError, match=r"names shard 'pytorch_model-00001.bin', which is not a .safetensors"):
        cs.load_lvlm(folder)
    assert not marker.exists()


@pytest.mark.parametrize("shard, message", [
    ("../outside.safetensors", "outside the model folder"),
    ("/etc/passwd.safetensors", "outside the model folder"),
    ("model-00009-of-00009.safetensors", "which is missing"),
])
def test_index_shard_escape_and_missing(tmp_path, saved_llava, shard, message):
    folder = _copy(saved_llava, tmp_path / "m")
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(ModelSourceError, match=message):
        cs.load_lvlm(folder)


def test_pickled_adapter_is_refused_unopened(tmp_path, no_stdin):
    marker = tmp_path / "MARKER"
    folder = _delta_copy(tmp_path)
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    _evil_pickle(folder / "adapter" / "adapter_model.bin", marker)
    with pytest.raises(ModelSourceError, match=r"has no adapter_model.safetensors \(found pickled adapter_model.bin"):
        cs.load_lvlm(folder)
    assert not marker.exists()


# --- damaged safetensors -----------------------------------------------------------------------------


def test_truncated_and_garbage_model_safetensors(tmp_path, saved_llava):
    folder = _copy(saved_llava, tmp_path / "m")
    weights = folder / "model.safetensors"
    _truncate(weights)
    with pytest.raises(ModelSourceError, match=r"model.safetensors' is not a valid safetensors file \(truncated\)"):
        cs.load_lvlm(folder)
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelSourceError, match=r"model.safetensors' .*header length field says"):
        cs.load_lvlm(folder)
    weights.write_bytes((6).to_bytes(8, "little") + b"\xff\xfegarb")
    with pytest.raises(ModelSourceError, match=r"model.safetensors' .*header is not JSON"):
        cs.load_lvlm(folder)
    weights.write_bytes(b"abc")
    with pytest.raises(ModelSourceError, match=r"model.safetensors' .*shorter than its 8-byte header"):
        cs.load_lvlm(folder)
    header = json.dumps({"w": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(ModelSourceError, match=r"model.safetensors' is not a valid safetensors file"):
        cs.load_lvlm(folder)


def test_truncated_shard_is_named(tmp_path, sharded_llava):
    folder = _copy(sharded_llava, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    _truncate(shard, 0.9)
    with pytest.raises(ModelSourceError, match=rf"{shard.name}' is not a valid safetensors file \(truncated\)"):
        cs.load_lvlm(folder)


def test_sharded_folder_still_loads(sharded_llava):
    assert cs.load_lvlm(sharded_llava).n_layers == 4


@pytest.mark.parametrize("target", ["delta.safetensors", "adapter/adapter_model.safetensors"])
def test_truncated_delta_and_adapter_are_named(tmp_path, target):
    folder = _delta_copy(tmp_path)
    _truncate(folder / target)
    with pytest.raises(ModelSourceError, match=rf"{Path(target).name}' is not a valid safetensors file"):
        cs.load_lvlm(folder)


def test_check_safetensors_accepts_shipped_files():
    for path in SHIPPED.rglob("*.safetensors"):
        check_safetensors(path)


# --- chat templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "refused by the Jinja sandbox"),
    ("{% for m in messages %}{{ m.content", "cannot be rendered: TemplateSyntaxError"),
    ("{{ raise_exception('no system role') }}", "cannot be rendered"),
])
def test_hostile_or_broken_chat_template_is_an_input_error(template, message):
    from cleansight_analysis.inputs.templates import render_prompt

    _, proc = tiny.tiny_random_llava()
    proc.chat_template = template
    with pytest.raises(InputError, match=message):
        render_prompt(proc, "what color is it?", 1)


# --- model cards -------------------------------------------------------------------------------------


def _card(root: Path, folder: str, **card) -> Path:
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "card.json").write_text(json.dumps(card))
    return path


def _register(root: Path) -> tuple[list[str], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = register_model_folders(root)
    return names, [str(w.message) for w in caught if issubclass(w.category, CardWarning)]


@pytest.mark.parametrize("card, message", [
    ({"name": "x", "attack": "badnet"}, "'attack' must be null or an object with a 'name', got str 'badnet'"),
    ({"name": "x", "attack": {"target": "t"}}, "'attack.name' must be a non-empty string"),
    ({"name": "bad\x1b[31mred"}, "'name' 'bad\\x1b[31mred' holds the control character '\\x1b'"),
    ({"name": "two\nlines"}, "holds the control character '\\n'"),
    ({"name": 7}, "'name' must be a string, got int 7"),
    ({"name": "x", "metrics": {"asr": "high"}}, "'metrics.asr' must be a finite number or null, got 'high'"),
    ({"name": "x", "metrics": [1, 2]}, "'metrics' must be an object"),
    ({"name": "x", "mode": 3}, "'mode' must be a string"),
    ({"name": "x", "base": ""}, "'base' '' is empty"),
])
def test_bad_card_is_skipped_with_a_warning(tmp_path, registry_copy, card, message):
    _card(tmp_path, "bad", **card)
    _card(tmp_path, "good", name="good-one", attack=None, mode="full", metrics={"clean_acc": 0.5, "asr": None})
    names, warned = _register(tmp_path)
    assert names == ["good-one"]
    assert len(warned) == 1 and str(tmp_path / "bad" / "card.json") in warned[0]
    assert message in warned[0]
    with pytest.raises(CardError):
        read_card(tmp_path / "bad")


def test_cards_that_are_not_json_or_not_objects(tmp_path, registry_copy):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "card.json").write_text("{not json")
    _card(tmp_path, "b")  # {} is fine: named after its folder
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "card.json").write_text("[1, 2]")
    names, warned = _register(tmp_path)
    assert names == ["b"]
    assert any("not readable JSON" in w for w in warned) and any("must be a JSON object, got list" in w for w in warned)


def test_card_cannot_replace_a_builtin_or_another_folders_name(tmp_path, registry_copy):
    _card(tmp_path, "a", name="tiny-random-llava")
    _card(tmp_path, "b", name="tiny-random-llava-next")
    _card(tmp_path, "c", name="shared")
    _card(tmp_path / "other", "d", name="shared")
    names, warned = _register(tmp_path)
    assert names == ["shared"]
    assert sum("is a built-in model; a card cannot replace it" in w for w in warned) == 2
    assert any("name 'shared' is already registered from" in w and str(tmp_path / "c") in w for w in warned)
    assert registry.lookup("tiny-random-llava").builder is tiny.tiny_random_llava
    assert registry.lookup("shared").path == tmp_path / "c"
    names, warned = _register(tmp_path)  # registering the same folders again is quiet
    assert names == ["shared"] and sum("already registered" in w for w in warned) == 1


def test_base_chain_loops_and_depth(tmp_path, registry_copy, no_stdin):
    selfish = _card(tmp_path, "selfish", name="selfish", base=".")
    _card(tmp_path, "a", name="a", base="../b")
    _card(tmp_path, "b", name="b", base="../a")
    for i in range(10):
        _card(tmp_path, f"d{i}", name=f"d{i}", base=f"../d{i + 1}")
    names, warned = _register(tmp_path)
    assert not {"selfish", "a", "b", "d0"} & set(names)  # d1 .. d9: 9 hops to a missing base, reported on load
    assert any("'base' chain loops" in w and "selfish" in w for w in warned)
    assert any("'base' chain loops" in w and str(tmp_path / "a") in w and str(tmp_path / "b") in w for w in warned)
    assert any("longer than 8" in w for w in warned)
    with pytest.raises(CardError, match=r"'base' chain loops: .*selfish -> .*selfish"):
        cs.load_lvlm(selfish)
    with pytest.raises(CardError, match=r"chain is longer than 8: .*d0 -> .*d9"):
        cs.load_lvlm(tmp_path / "d0")


def test_bad_card_in_models_folder_keeps_import_and_help_working(tmp_path):
    models = tmp_path / "models"
    _card(models, "bad", name="x", attack="badnet")
    _card(models, "loop", name="loop", base=".")
    _card(models, "builtin", name="tiny-random-llava")
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import cleansight_analysis as cs\n"
            "from cleansight_analysis.models.registry import lookup\n"
            "assert lookup('tiny-random-llava').builder is not None\n"
            "assert lookup('x') is None and lookup('loop') is None\n"
            "from cleansight_analysis.cli import main\n"
            "main(['--help'])\n")
    env = {**os.environ, "CLEANSIGHT_DATA": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()
    assert "'attack' must be null" in out.stderr and "chain loops" in out.stderr and "built-in" in out.stderr


def test_shipped_cards_pass_the_schema():
    for path in SHIPPED.glob("*/card.json"):
        assert read_card(path.parent) is not None


def test_adapter_config_naming_a_module_to_import_is_refused(tmp_path):
    folder = _delta_copy(tmp_path)
    config_path = folder / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "megatron_config": {"x": 1}, "megatron_core": "evil_module"}))
    with pytest.raises(ModelSourceError, match="megatron_config"):
        cs.load_lvlm(folder)
