"""The calibration study (``python -m evaluation study``): input validation, temperature scaling,
NaN handling, atomic output, a tiny end-to-end run and the notebook that reads its report."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from evaluation.__main__ import main
from evaluation.baselines.temperature import TemperatureScaled, fit_temperature
from evaluation.study import runner
from evaluation.study.checkpoints import get_map_model
from evaluation.study.config import StudyConfig, validate_config
from evaluation.study.data import plan_data
from evaluation.study.errors import StudyError, StudyRunError
from evaluation.study.evaluate import evaluate_method
from evaluation.study.methods import FittedMethod, laplace_torch_available
from evaluation.study.outdir import atomic_output
from evaluation.study.report import check_finite

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "calibration_study.ipynb"
SMOKE_METHODS = ("map", "temp", "kfoc")


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a validation test gets as far as training a network."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the study started training before rejecting bad input")

    monkeypatch.setattr(runner, "get_map_model", refuse)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["study", "--no-progress", *args])
    return code, capsys.readouterr().err


# -- bad input: a clear error before any long work ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--dataset", "nope"], ["unknown dataset 'nope'", "digits", "digits04", "mnist"]),
        (["--model", "resnet"], ["unknown model 'resnet'", "mlp", "cnn"]),
        (["--methods", "map,swag"], ["unknown method 'swag'", "kfoc", "kfoc-ll", "temp"]),
        (["--ood", "uniform,svhm"], ["unknown OOD set 'svhm'", "natural_patches", "digits59"]),
        (["--subsets", "first_layer"], ["first_layer", "all", "last_layer"]),
        (["--seeds", "0"], ["--seeds must be an integer >= 1"]),
        (["--threads", "0"], ["--threads must be an integer >= 1, got 0"]),
        (["--dataset", "mnist"], ["--data-dir"]),
        (["--dataset", "wine", "--model", "cnn"], ["model 'cnn' needs an image data set"]),
    ],
)
def test_bad_names_fail_before_training(
    args: list[str],
    expected: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_training: None,
) -> None:
    code, err = run_cli([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith("error: ")
    for text in expected:
        assert text in err
    assert not (tmp_path / "out").exists()


def test_data_dir_without_files_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    code, err = run_cli(
        ["--dataset", "mnist", "--data-dir", str(empty), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", str(empty)):
        assert name in err


def test_explicit_file_ood_without_files_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    code, err = run_cli(["--ood", "kmnist", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "kmnist" in err and "--data-dir" in err


@pytest.mark.skipif(laplace_torch_available(), reason="laplace-torch is installed here")
def test_laplace_torch_requested_but_absent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    code, err = run_cli(["--methods", "map,laplace-torch", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "laplace-torch" in err and "not importable" in err


def test_output_dir_with_a_different_study_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    out = tmp_path / "report"
    out.mkdir()
    other = StudyConfig(dataset="digits04", seeds=1, out=out)
    stamp = {
        "format": "bayes-kfoc-study",
        "fingerprint": other.fingerprint(),
        "config": other.to_json(),
    }
    (out / "study.json").write_text(json.dumps(stamp))
    code, err = run_cli(["--seeds", "1", "--out", str(out)], capsys)
    assert code == 2
    assert "different study" in err and "--overwrite" in err and "dataset" in err
    assert json.loads((out / "study.json").read_text()) == stamp  # untouched


def test_non_empty_output_dir_without_a_study_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    code, err = run_cli(["--out", str(out)], capsys)
    assert code == 2
    assert "study.json" in err and "--overwrite" in err
    assert (out / "chapter1.tex").read_text() == "precious"


def test_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset" in out and "--overwrite" in out
    for name in ("digits04", "breast_cancer", "cifar10", "natural_patches", "digits59"):
        assert name in out  # data sets and OOD sets are listed
    for option in ("--tau-range", "--angles", "--no-shift", "--ood-points", "--fidelity-points",
                   "--no-sweep"):  # fmt: skip
        assert option in out


def test_tau_range_and_angles_reach_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    code, err = run_cli(["--tau-range", "10,1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--tau-range" in err
    cfg = StudyConfig(tau_range=(1e-1, 1e3, 5), angles=(0, 90))
    assert validate_config(cfg).tau_grid == pytest.approx([0.1, 1.0, 10.0, 100.0, 1000.0])
    assert cfg.fingerprint() != StudyConfig().fingerprint()


def test_shared_glm_pass_equals_the_librarys_predict_and_samples() -> None:
    """One GLM pass per chunk gives what la.predict and la.predictive_samples give separately."""
    from bayes_kfoc import Laplace
    from datasets import load_dataset
    from evaluation.study.evaluate import predictive
    from evaluation.study.methods import fit_method

    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    fitted = fit_method("kfac", model, splits)
    assert fitted.glm is not None
    la = fitted.predict.__self__  # the Laplace object behind the method
    assert isinstance(la, Laplace)
    x = splits.test.tensors[0]
    probs, samples, logits = predictive(fitted, x, 5, seed=3, logits=True)
    assert torch.allclose(probs, la.predict(x), atol=1e-6)
    gen = torch.Generator().manual_seed(3)
    assert samples is not None
    assert torch.allclose(samples, la.predictive_samples(x, n_samples=5, generator=gen), atol=1e-6)
    # the logit scores' logits: the GLM mean, i.e. the MAP logits divided by the temperature
    assert logits is not None
    assert torch.allclose(logits, la.glm_distribution(x)[0], atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(logits, model(x) / la.temperature, atol=1e-5)


def test_expanded_methods_and_fingerprint() -> None:
    cfg = validate_config(StudyConfig(methods=("map", "kfoc", "diag-ll"), seeds=1))
    assert cfg.method_list == ("map", "diag-ll", "kfoc", "kfoc-ll")
    same = StudyConfig(methods=("map", "kfoc", "diag-ll"), seeds=1, out=Path("elsewhere"))
    assert validate_config(same).fingerprint() == cfg.fingerprint()
    assert StudyConfig(seeds=2).fingerprint() != StudyConfig(seeds=1).fingerprint()
    only_all = validate_config(StudyConfig(methods=("kfac",), subsets=("all",)))
    assert only_all.method_list == ("kfac",)
    with pytest.raises(StudyError, match="valid methods: map, temp, diag"):
        validate_config(StudyConfig(methods=("kfoc", "ggn")))


IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _write_idx(folder: Path, n_train: int = 200, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = [
        rng.integers(0, 256, (n_train, 8, 8)),
        np.arange(n_train) % 10,
        rng.integers(0, 256, (n_test, 8, 8)),
        np.arange(n_test) % 10,
    ]
    for name, a in zip(IDX_NAMES, arrays, strict=True):
        header = struct.pack(">I", 2051 if a.ndim == 3 else 2049)
        header += b"".join(struct.pack(">I", d) for d in a.shape)
        (folder / name).write_bytes(header + a.astype(np.uint8).tobytes())


def test_local_files_and_sibling_ood_lookup(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_idx(data / "mnist")
    _write_idx(data / "KMNIST")
    for root in (data, data / "mnist"):
        cfg = validate_config(StudyConfig(dataset="mnist", data_dir=root, out=tmp_path / "o"))
        plan = plan_data(cfg)
        assert plan.dataset_dir == data / "mnist"
        assert plan.ood_sets == ("uniform", "gaussian", "natural_patches", "kmnist")
        assert plan.ood_dirs == {"kmnist": data / "KMNIST"}
        assert any("fashion_mnist" in n and "skipped" in n for n in plan.notes)
        seed1 = plan.load(1)
        assert seed1.ood["kmnist"].shape == (20, 64)
    with pytest.raises(StudyError, match="its own folder"):
        plan_data(validate_config(StudyConfig(dataset="kmnist", data_dir=data / "mnist",
                                              ood=("mnist",))))  # fmt: skip


# -- temperature scaling --------------------------------------------------------------------------


def test_temperature_closed_form() -> None:
    """Logits (a, 0) with a fraction q of label 0: softmax(a/T)_0 = q at the optimum, so
    T* = a / log(q / (1 - q))."""
    a, q, n = 3.0, 0.8, 1000
    logits = torch.tensor([[a, 0.0]]).repeat(n, 1)
    labels = torch.zeros(n, dtype=torch.long)
    labels[int(q * n) :] = 1
    expected = a / math.log(q / (1 - q))
    assert fit_temperature(logits, labels) == pytest.approx(expected, rel=1e-6)


def test_temperature_matches_a_brute_force_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(500, 5, generator=gen)
    labels = torch.where(
        torch.rand(500, generator=gen) < 0.6,
        logits.argmax(1),
        torch.randint(0, 5, (500,), generator=gen),
    )
    z = logits.double()

    def grid_nll(grid: torch.Tensor) -> torch.Tensor:  # NLL at every T of the grid at once
        logp = torch.log_softmax(z / grid[:, None, None], dim=-1)
        return -logp.gather(2, labels.expand(len(grid), -1).unsqueeze(-1)).squeeze(-1).mean(1)

    coarse = torch.logspace(-1, 1, 2001, dtype=torch.float64)
    i = int(grid_nll(coarse).argmin())
    grid = torch.linspace(float(coarse[i - 1]), float(coarse[i + 1]), 2001, dtype=torch.float64)
    nll = grid_nll(grid)
    best = float(grid[nll.argmin()])
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(best, rel=1e-4)
    assert float(torch.nn.functional.cross_entropy(z / t, labels)) <= float(nll.min()) + 1e-9


def test_temperature_scaled_keeps_the_argmax() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(50, 4)
    scaled = TemperatureScaled(model, 2.5)
    probs = scaled.predict(x)
    assert torch.equal(probs.argmax(1), model(x).argmax(1))
    assert torch.allclose(probs.sum(1), torch.ones(50))
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaled(model, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((3, 2), float("nan")), torch.zeros(3, dtype=torch.long))


# -- NaN never reaches a table ---------------------------------------------------------------------


def test_nan_probabilities_raise_with_the_method_name() -> None:
    x = torch.rand(20, 64)
    y = torch.randint(0, 10, (20,))

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        return torch.full((len(inputs), 10), float("nan"))

    with pytest.raises(StudyRunError, match=r"method 'broken', seed 3, in-distribution.*NaN"):
        evaluate_method(FittedMethod("broken", predict, None), 3, (x, y), {}, (), None, 2)


def test_nan_in_samples_raises_in_the_ood_step() -> None:
    x = torch.rand(20, 64)
    y = torch.randint(0, 10, (20,))

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        return torch.full((len(inputs), 10), 0.1)

    def samples(inputs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        return torch.full((n, len(inputs), 10), float("nan"))

    fitted = FittedMethod("nan-samples", predict, samples)
    with pytest.raises(StudyRunError, match="method 'nan-samples', seed 0, OOD"):
        evaluate_method(fitted, 0, (x, y), {"uniform": torch.rand(5, 64)}, (), None, 2)


def test_check_finite_names_the_path() -> None:
    check_finite({"a": [1, 2.5, {"b": True, "c": None, "d": "x"}]})
    with pytest.raises(StudyRunError, match=r"results\.seeds\[0\]\.nll"):
        check_finite({"seeds": [{"nll": float("nan")}]})


# -- atomic output and the checkpoint cache --------------------------------------------------------


STAMP = {"format": "bayes-kfoc-study", "fingerprint": "f", "config": {}}


def test_atomic_output_leaves_no_half_written_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    with atomic_output(out, STAMP) as tmp:
        (tmp / "results.json").write_text("{}")
    assert (out / "results.json").read_text() == "{}"
    assert json.loads((out / "study.json").read_text())["files"] == ["results.json", "study.json"]
    with pytest.raises(RuntimeError, match="crash"), atomic_output(out, STAMP) as tmp:
        (tmp / "results.json").write_text('{"half": ')
        raise RuntimeError("crash")
    assert (out / "results.json").read_text() == "{}"  # the previous report, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary left
    with atomic_output(out, STAMP) as tmp:
        (tmp / "report.md").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "study.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_replacing_a_report_keeps_the_users_files(tmp_path: Path) -> None:
    """Only the files the previous report listed are removed; a user's note stays."""
    out = tmp_path / "report"
    with atomic_output(out, STAMP) as tmp:
        (tmp / "figures").mkdir()
        (tmp / "figures" / "old.png").write_bytes(b"png")
        (tmp / "report.md").write_text("old")
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "annotated.png").write_bytes(b"mine too")
    with atomic_output(out, STAMP) as tmp:
        (tmp / "report.md").write_text("new")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "figures" / "annotated.png").read_bytes() == b"mine too"
    assert not (out / "figures" / "old.png").exists()
    assert (out / "report.md").read_text() == "new"
    # a user's file under a report file's name is never replaced
    (out / "study.json").unlink()
    with (
        pytest.raises(StudyError, match=r"report\.md.*did not write"),
        atomic_output(out, STAMP) as tmp,
    ):
        (tmp / "report.md").write_text("newer")
    assert (out / "report.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_out_equal_to_data_dir_with_overwrite_keeps_every_data_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "mnist"
    _write_idx(data, n_train=120, n_test=20)
    (data / "README.txt").write_text("where this data came from")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    args = ["--dataset", "mnist", "--data-dir", str(data), "--out", str(data), "--seeds", "1",
            "--epochs", "1", "--methods", "map", "--quick", "--no-fidelity",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    code, err = run_cli(args, capsys)
    assert code == 2 and "--overwrite" in err  # not empty and not a report: refused
    for _ in range(2):  # the second run replaces the tool's own report
        code, err = run_cli([*args, "--overwrite"], capsys)
        assert code == 0, err
        for path, content in before.items():
            assert path.read_bytes() == content, path
        assert (data / "report.md").is_file() and (data / "study.json").is_file()


def test_changed_data_means_a_retrained_network_and_a_different_study(tmp_path: Path) -> None:
    from datasets import load_dataset

    a, b = tmp_path / "a", tmp_path / "b"
    _write_idx(a)
    _write_idx(b)
    labels = b / IDX_NAMES[1]
    raw = bytearray(labels.read_bytes())
    raw[8:] = bytes(np.random.default_rng(1).permutation(np.frombuffer(bytes(raw[8:]), np.uint8)))
    labels.write_bytes(bytes(raw))  # shuffled training labels, same shapes and file names
    cfgs = []
    for root in (a, b, a):
        cfg = validate_config(
            StudyConfig(dataset="mnist", data_dir=root, seeds=1, epochs=1, out=tmp_path / "o",
                        cache_dir=tmp_path / "c", progress=False)
        )  # fmt: skip
        plan_data(cfg)
        cfgs.append(cfg)
    assert cfgs[0].fingerprint() != cfgs[1].fingerprint()
    assert cfgs[0].fingerprint() == cfgs[2].fingerprint()
    splits = {root: load_dataset("mnist", seed=0, data_dir=root) for root in (a, b)}
    assert not get_map_model(cfgs[0], splits[a], 0).cached
    assert not get_map_model(cfgs[1], splits[b], 0).cached  # other data: trained again
    assert get_map_model(cfgs[2], splits[a], 0).cached
    half = load_dataset("mnist", seed=0, data_dir=a)
    x, y = half.train.tensors
    half.train.tensors = (x[: len(x) // 2], y[: len(y) // 2])
    assert not get_map_model(cfgs[0], half, 0).cached  # half the training set: trained again


def test_map_checkpoint_cache_round_trip(tmp_path: Path) -> None:
    from datasets import load_dataset

    cfg = validate_config(
        StudyConfig(seeds=1, epochs=1, out=tmp_path / "o", cache_dir=tmp_path / "c", progress=False)
    )
    splits = load_dataset("digits", seed=0)
    first = get_map_model(cfg, splits, 0)
    assert not first.cached and first.path is not None and first.path.is_file()
    second = get_map_model(cfg, splits, 0)
    assert second.cached
    for (k, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), k
    first.path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unusable MAP checkpoint"):
        third = get_map_model(cfg, splits, 0)
    assert not third.cached


@pytest.mark.slow
def test_fisher_fidelity_runs_at_mnist_input_size() -> None:
    """784 inputs, 7,000 points, a 100,480-parameter layer: estimated on subsets, not skipped."""
    from torch.utils.data import TensorDataset

    from datasets import Splits
    from evaluation.models import build_model
    from evaluation.study.fidelity import fidelity_section

    torch.manual_seed(0)
    x, y = torch.rand(7000, 784), torch.randint(0, 10, (7000,))
    ds = TensorDataset(x, y)
    splits = Splits(ds, ds, ds, num_classes=10, input_shape=(784,), name="synthetic")
    section, note = fidelity_section(build_model("mlp", (784,), 10), splits, points=200, draws=2)
    assert note is None and section is not None
    assert section["n_train"] == 7000 and section["n_points"] == 200 and section["draws"] == 2
    layers = section["layers"]
    assert [layer["module"] for layer in layers] == ["0", "2", "4"]
    assert layers[0]["num_params"] == 784 * 128 + 128
    assert layers[0]["label"].endswith("Linear 784→128")
    for layer in layers:
        errs, sds = layer["errors"], layer["errors_sd"]
        assert all(0.0 <= errs[s] <= 1.0 + 1e-9 for s in errs)  # each is a projection's error
        assert errs["kfoc"] <= errs["kfac"] + 1e-6  # K-FOC is the Frobenius-optimal Kronecker
        assert all(sd >= 0 for sd in sds.values())


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny study: digits, MLP, 1 seed, 2 epochs, map / temp / kfoc (+ kfoc-ll), --quick."""
    base = tmp_path_factory.mktemp("study")
    out = base / "report"
    threads = torch.get_num_threads()
    code = main(
        [
            "study", "--dataset", "digits", "--model", "mlp", "--seeds", "1", "--epochs", "2",
            "--methods", ",".join(SMOKE_METHODS), "--quick", "--no-progress",
            "--out", str(out), "--cache-dir", str(base / "cache"),
        ]
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # the study restores the thread count
    assert code == 0
    return out


def _numbers(obj: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, int | float):
        return [(path, float(obj))]
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _numbers(v, f"{path}.{k}")]
    assert isinstance(obj, list), f"{path}: {type(obj)}"
    return [n for i, v in enumerate(obj) for n in _numbers(v, f"{path}[{i}]")]


def test_smoke_study_writes_a_complete_finite_report(smoke_report: Path) -> None:
    results = json.loads((smoke_report / "results.json").read_text())
    expected_figures = ["figures/reliability.png", "figures/shift.png",
                        "figures/fisher_fidelity.png", "figures/prior_sweep.png"]  # fmt: skip
    for o in ("uniform", "gaussian", "natural_patches"):
        expected_figures += [f"figures/ood_{o}.png", f"figures/roc_{o}.png"]
    assert sorted(results["figures"]) == sorted(expected_figures)
    for name in ["results.json", "report.md", "study.json", *expected_figures]:
        path = smoke_report / name
        assert path.is_file() and path.stat().st_size > 0, name
    numbers = _numbers(results)
    assert len(numbers) > 500
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad[:5]
    assert results["methods"] == ["map", "temp", "kfoc", "kfoc-ll"]
    assert results["ood_sets"] == ["uniform", "gaussian", "natural_patches"]
    seed = results["seeds"][0]
    for m in results["methods"]:
        entry = seed["methods"][m]
        assert set(entry["in_distribution"]) == {
            "accuracy", "nll", "brier", "ece", "mce", "adaptive_ece"
        }  # fmt: skip
        assert len(entry["shift"]["nll"]) == len(results["angles"]) > 1
        has_mi = "mutual_info" in entry["ood"]["uniform"]
        assert has_mi == m.startswith("kfoc")
        for o in results["ood_sets"]:  # the logit scores: every method, every OOD set
            assert {"max_prob", "entropy", "energy", "max_logit"} <= set(entry["ood"][o])
    assert seed["methods"]["kfoc"]["hyperparameters"]["prior_precision"] > 0
    assert seed["methods"]["kfoc"]["hyperparameters"]["prior_scale"] > 0
    assert seed["methods"]["kfoc"]["hyperparameters"]["temperature"] >= 1.0
    # the matched-prior sweep: the study's own kfoc posterior (not refitted), 15 scales
    sweep = results["prior_sweep"]
    assert list(sweep["structures"]) == ["kfoc"] and sweep["ood_set"] == "uniform"
    curve = sweep["structures"]["kfoc"]
    assert not curve["refit"] and len(curve["nll"]) == len(sweep["scales"]) == 15
    assert curve["chosen"]["scale"] == seed["methods"]["kfoc"]["hyperparameters"]["prior_scale"]
    kfoc = seed["methods"]["kfoc"]  # the tuned predictive: the numbers of the tables
    assert curve["tuned"]["nll"] == pytest.approx(kfoc["in_distribution"]["nll"], rel=1e-6)
    assert curve["tuned"]["ece"] == pytest.approx(kfoc["in_distribution"]["ece"], abs=1e-6)
    assert curve["tuned"]["auroc"] == pytest.approx(
        kfoc["ood"]["uniform"]["entropy"]["auroc"], abs=1e-6
    )
    mapped = seed["methods"]["map"]
    assert sweep["map"]["nll"] == pytest.approx(mapped["in_distribution"]["nll"], rel=1e-6)
    assert sweep["map"]["auroc"] == pytest.approx(mapped["ood"]["uniform"]["entropy"]["auroc"])
    assert curve["nll"][-1] == pytest.approx(sweep["map"]["nll"], rel=0.05)  # s → ∞: the MAP
    assert seed["methods"]["temp"]["hyperparameters"]["temperature"] > 0
    assert results["fisher_fidelity"]["layers"]
    report = (smoke_report / "report.md").read_text()
    for m in results["methods"]:
        assert f"| {m} |" in report
    assert "**" in report and "nan" not in report.lower()
    for text in ("#### energy", "#### max-logit", "Does curvature quality matter?",
                 "nothing to compare", "figures/prior_sweep.png", "| kfoc | T (mean ± sd) |",
                 "| kfoc | prior scale s", "| temp | T (mean ± sd) |"):  # fmt: skip
        assert text in report, text
    assert not [p for p in smoke_report.parent.iterdir() if p.name.startswith(".")]


def test_rerunning_the_same_study_replaces_it(smoke_report: Path) -> None:
    """Same fingerprint: not refused, and the report is written anew (a stale marker in the old
    report's results.json is gone, no temporary directory is left)."""
    stamp = json.loads((smoke_report / "study.json").read_text())
    (smoke_report / "results.json").write_text('{"stale": true}')
    code = main(
        [
            "study", "--dataset", "digits", "--model", "mlp", "--seeds", "1", "--epochs", "2",
            "--methods", ",".join(SMOKE_METHODS), "--quick", "--no-progress",
            "--out", str(smoke_report), "--cache-dir", str(smoke_report.parent / "cache"),
        ]
    )  # fmt: skip
    assert code == 0
    results = json.loads((smoke_report / "results.json").read_text())
    assert "stale" not in results and results["fingerprint"] == stamp["fingerprint"]
    assert json.loads((smoke_report / "study.json").read_text())["files"] == stamp["files"]
    assert not [p for p in smoke_report.parent.iterdir() if p.name.startswith(".")]


def test_notebook_executes_on_the_smoke_report(
    smoke_report: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "store the notebook without outputs"
    )
    monkeypatch.setenv("BAYES_KFOC_REPORT", str(smoke_report))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    text = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert str(smoke_report) in text
    assert "kfoc-ll" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == len(json.loads((smoke_report / "results.json").read_text())["figures"])


@pytest.mark.slow
def test_marglik_methods_write_their_section_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "report"
    code = main(
        [
            "study", "--dataset", "digits", "--model", "mlp", "--seeds", "1", "--epochs", "2",
            "--methods", "map,temp,marglik-diag,marglik-kfoc", "--quick", "--no-progress",
            "--no-fidelity", "--no-sweep", "--no-shift", "--no-cache", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert "figures/marglik.png" in results["figures"] and (out / "figures/marglik.png").is_file()
    seed = results["seeds"][0]
    for m in ("marglik-diag", "marglik-kfoc"):
        trace = seed["methods"][m]["marglik"]
        assert trace["epoch"] == [1, 2] and trace["refit_epoch"] == [1, 2]
        assert all(math.isfinite(e) for e in trace["log_evidence"])
        assert set(trace["prior_precision"]) == {"0", "2", "4"}  # the MLP's three Linears
        assert seed["methods"][m]["hyperparameters"]["temperature"] == 1.0
    report = (out / "report.md").read_text()
    assert "## Marginal-likelihood training" in report and "| marglik-kfoc |" in report
    assert "nan" not in report.lower()
