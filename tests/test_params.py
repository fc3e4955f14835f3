"""params.yaml: the repo's file loads; every bad value names the file and the dotted key."""

from __future__ import annotations

import copy

import pytest
import yaml

from mlipops.errors import MlipopsError, ParamsError
from mlipops.params import Params, flatten, load_params


@pytest.fixture
def u_raw_params(u_repo_root) -> dict:
    return yaml.safe_load((u_repo_root / "params.yaml").read_text())


def _write(tmp_path, raw) -> "Path":  # noqa: F821
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for k in parents:
        node = node[k]
    node[last] = value
    return raw


def test_repo_params_load(u_repo_root, u_raw_params):
    p = load_params(u_repo_root / "params.yaml")
    assert isinstance(p, Params)
    assert p.generate.element == u_raw_params["generate"]["element"]
    assert p.train.epochs == u_raw_params["train"]["epochs"]
    assert p.validate_.allowed_species == u_raw_params["validate"]["allowed_species"]
    assert p.descriptors.angular_cutoff <= p.descriptors.cutoff
    assert [s.path for s in p.ingest.sources] == [s["path"] for s in u_raw_params["ingest"]["sources"]]
    flat = flatten(p)
    assert flat["train.epochs"] == p.train.epochs
    assert flat["validate.max_abs_force"] == p.validate_.max_abs_force  # alias, not validate_


@pytest.mark.parametrize("key, value", [
    ("train.epochs", 0),
    ("train.epochs", "many"),
    ("train.learning_rate", -1e-3),
    ("train.dtype", "float16"),
    ("train.batch_size", 0),
    ("descriptors.cutoff", 0.0),
    ("descriptors.max_l", 7),
    ("ingest.split.method", "alphabetical"),
    ("ingest.split.val_fraction", 1.5),
    ("validate.max_abs_force", -1.0),
    ("index.coordination_cutoff", 0),
    ("index.pca_components", 7),
    ("index.pca_components", 0),
    ("generate.crystals.structures", ["fcc", "quasicrystal"]),
    ("generate.liquid.temperature_K", -5.0),
])
def test_bad_value_names_file_and_dotted_key(tmp_path, u_raw_params, key, value):
    path = _write(tmp_path, _set(u_raw_params, key, value))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert "params.yaml" in msg
    assert key in msg
    assert isinstance(info.value, MlipopsError)


@pytest.mark.parametrize("key", ["train.epochz", "descriptors.radius", "bogus_section",
                                 "generate.liquid.pressure"])
def test_unknown_keys_rejected(tmp_path, u_raw_params, key):
    path = _write(tmp_path, _set(u_raw_params, key, 1))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "params.yaml" in str(info.value) and key in str(info.value)


def test_angular_cutoff_above_cutoff_rejected(tmp_path, u_raw_params):
    raw = _set(u_raw_params, "descriptors.cutoff", 4.0)
    raw["descriptors"]["angular_cutoff"] = 4.5
    with pytest.raises(ParamsError) as info:
        load_params(_write(tmp_path, raw))
    assert "descriptors.angular_cutoff" in str(info.value)
    # also against the default cutoff (5.0) when cutoff is not given
    raw = copy.deepcopy(u_raw_params)
    raw["descriptors"] = {"angular_cutoff": 6.0}
    with pytest.raises(ParamsError, match="descriptors.angular_cutoff"):
        load_params(_write(tmp_path, raw))
    # equal is allowed
    raw["descriptors"] = {"cutoff": 4.0, "angular_cutoff": 4.0}
    assert load_params(_write(tmp_path, raw)).descriptors.angular_cutoff == 4.0


def test_unknown_element_rejected(tmp_path, u_raw_params):
    with pytest.raises(ParamsError) as info:
        load_params(_write(tmp_path, _set(u_raw_params, "generate.element", "Xq")))
    assert "generate.element" in str(info.value) and "Xq" in str(info.value)


def test_missing_required_section(tmp_path, u_raw_params):
    raw = copy.deepcopy(u_raw_params)
    del raw["ingest"]
    with pytest.raises(ParamsError, match="ingest"):
        load_params(_write(tmp_path, raw))


def test_missing_file_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ParamsError, match="params.yaml.*not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [epochs: 3\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("key,value,says", [
    ("train.hidden", [200000, 200000], "more than the cap"),
    ("train.hidden", [8] * 17, "at most 16 layers"),
    ("train.hidden", [32, 0], "positive widths"),
    ("train.ensemble.members", 1000, "train.ensemble.members"),
    ("descriptors.cutoff", 1e6, "descriptors.cutoff"),
    ("descriptors.n_radial", 100000, "descriptors.n_radial"),
    ("train.dispersion.cutoff", 1e4, "train.dispersion.cutoff"),
])
def test_model_size_is_capped_in_params(tmp_path, u_raw_params, key, value, says):
    """params.yaml cannot ask for a network larger than a model folder may be (the caps of
    mlipops.models.schema): one line naming the key, before anything is allocated."""
    raw = _set(copy.deepcopy(u_raw_params), key, value)
    with pytest.raises(ParamsError) as info:
        load_params(_write(tmp_path, raw))
    msg = str(info.value)
    assert says in msg and "\n" not in msg, msg


def test_params_survive_a_dump_and_validate_round_trip(u_repo_root):
    """A Params dumped (every field, defaults included) validates again to the same Params: code that copies
    params with model_dump (the active-learning campaign, the tests) must not trip over a default."""
    p = load_params(u_repo_root / "params.yaml")
    doc = p.model_dump(by_alias=True, mode="json")
    doc["ingest"]["sources"][0] |= {"stress_units": "eV/A3", "stress_sign": "ase", "stress_order": "ase"}
    assert Params.model_validate(doc) == p
