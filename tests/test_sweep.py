"""The matched-prior sweep (``evaluation.study.sweep``, ``sweep_report``) and the logit OOD
scores in the study's evaluation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from datasets import Splits, load_dataset
from evaluation import metrics as M
from evaluation.study.config import StudyConfig, validate_config
from evaluation.study.evaluate import evaluate_method, ood_scores
from evaluation.study.methods import FittedMethod, fit_method
from evaluation.study.report import _timing_section
from evaluation.study.sweep import (
    PriorSweep,
    prior_base,
    sweep_ood_set,
    sweep_posterior,
    sweep_structures,
)
from evaluation.study.sweep_report import largest_differences, sweep_figure, sweep_section


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))


def test_sweep_structures_and_ood_choice() -> None:
    assert sweep_structures(("map", "temp", "kfoc", "kfac-ll", "kfoc-ll")) == ("kfac", "kfoc")
    assert sweep_structures(("map", "temp")) == ()
    assert sweep_ood_set(["natural_patches", "gaussian", "uniform"]) == "uniform"
    assert sweep_ood_set(["natural_patches", "gaussian"]) == "gaussian"
    assert sweep_ood_set(["digits59"]) == "digits59"
    assert sweep_ood_set([]) is None


def test_no_sweep_is_a_part_of_the_config() -> None:
    cfg = validate_config(StudyConfig(skip=("sweep",)))
    assert not cfg.runs("sweep") and StudyConfig().runs("sweep")
    assert cfg.fingerprint() != validate_config(StudyConfig()).fingerprint()


FLOAT32_REL = 1e-6  # float64 terms against the float32 model's predict
UNTRAINED = pytest.mark.filterwarnings("ignore:.*chosen prior scale:UserWarning")


@UNTRAINED
def test_sweep_restores_the_posterior_and_matches_predict(
    digits: Splits, small_model: torch.nn.Module
) -> None:
    fitted = fit_method("kfac", small_model, digits)
    la = fitted.posterior
    assert la is not None and la.tuning is not None and la.tuning.scale is not None
    tau, temperature = la.prior_precision.clone(), la.temperature
    # the tuned τ is the tuned scale times the base P_b / ||θ_b||²
    assert torch.allclose(la.tuning.scale * prior_base(la), tau, rtol=1e-10)
    x, y = digits.test.tensors
    x_ood = torch.rand(50, 64, generator=torch.Generator().manual_seed(0))
    scales = (1e-2, 1.0, 1e8)
    seen: list[str] = []
    out = sweep_posterior(la, (x, y), x_ood, scales, step=seen.append)
    assert seen == [
        f"{len(scales) + 1} prior scales from one Jacobian pass over {len(x) + 50} points"
    ]
    assert torch.equal(la.prior_precision, tau) and la.temperature == temperature  # restored
    # the sweep contracts the τ-independent terms in float64; predict runs in the model's float32
    assert out["tuned"]["nll"] == pytest.approx(M.nll(la.predict(x), y), rel=FLOAT32_REL)
    # one point by hand: τ = s · base, T = 1
    la.prior_precision = 1.0 * prior_base(la)
    la.temperature = 1.0
    probs = la.predict(torch.cat([x, x_ood]))
    la.prior_precision, la.temperature = tau, temperature
    assert out["nll"][1] == pytest.approx(M.nll(probs[: len(x)], y), rel=FLOAT32_REL)
    assert out["ece"][1] == pytest.approx(M.ece(probs[: len(x)], y), rel=FLOAT32_REL, abs=1e-6)
    ent = M.predictive_entropy(probs)
    assert out["auroc"][1] == pytest.approx(M.auroc(-ent[: len(x)], -ent[len(x) :]))
    # a huge scale is the MAP; a small one adds variance (higher entropy on every input)
    with torch.no_grad():
        map_nll = M.nll(torch.softmax(small_model(x), -1), y)
    assert out["nll"][2] == pytest.approx(map_nll, rel=1e-4)
    chosen = out["chosen"]
    assert chosen["scale"] == la.tuning.scale and chosen["temperature"] == temperature
    no_ood = sweep_posterior(la, (x, y), None, scales[:1])
    assert no_ood["auroc"] is None and no_ood["chosen"]["auroc"] is None


@UNTRAINED
def test_prior_sweep_refits_a_last_layer_only_request(
    digits: Splits, small_model: torch.nn.Module
) -> None:
    x, y = digits.test.tensors
    sweep = PriorSweep(("diag", "kfac"), small_model, (x, y), {}, scales=(0.1, 10.0))
    assert sweep.ood_set is None and sweep.map.auroc is None
    kfac = fit_method("kfac", small_model, digits).posterior
    assert kfac is not None
    sweep.add("kfac", kfac)
    refitted: list[str] = []

    def refit(structure: str) -> Any:
        refitted.append(structure)
        la = fit_method(structure, small_model, digits).posterior
        assert la is not None and la.modules == "all"
        return la

    section = sweep.finish(refit)
    assert refitted == ["diag"]
    curves = section["structures"]
    assert isinstance(curves, dict) and list(curves) == ["diag", "kfac"]
    assert curves["diag"]["refit"] and not curves["kfac"]["refit"]
    assert section["ood_set"] is None and section["n_ood"] == 0


def _synthetic_results(ood: bool = True) -> dict[str, Any]:
    scales = [0.1, 1.0, 10.0]

    def curve(nll: list[float], ece: list[float], auroc: list[float]) -> dict[str, Any]:
        point = {"nll": nll[1], "ece": ece[1], "auroc": auroc[1] if ood else None}
        return {
            "refit": False,
            "nll": nll,
            "ece": ece,
            "auroc": auroc if ood else None,
            "chosen": {"scale": 1.0, "temperature": 1.2, **point},
            "tuned": point,
            "seconds": 0.1,
        }

    return {
        "config": {"dataset": "digits", "model": "mlp"},
        "prior_sweep": {
            "seed": 0,
            "scales": scales,
            "temperature": 1.0,
            "prior": "scaled",
            "score": "entropy",
            "ood_set": "uniform" if ood else None,
            "n_test": 360,
            "n_ood": 100 if ood else 0,
            "map": {"nll": 0.3, "ece": 0.05, "auroc": 0.8 if ood else None},
            "structures": {
                "kfac": curve([0.5, 0.2, 0.3], [0.2, 0.02, 0.04], [0.95, 0.9, 0.85]),
                "kfoc": curve([0.9, 0.25, 0.3], [0.2, 0.03, 0.04], [0.97, 0.9, 0.85]),
            },
        },
    }


def test_largest_differences_closed_form() -> None:
    diffs = largest_differences(_synthetic_results()["prior_sweep"])
    by_metric = {d["metric"]: d for d in diffs}
    assert [(d["a"], d["b"]) for d in diffs] == [("kfoc", "kfac")] * 3
    nll = by_metric["nll"]  # K-FOC − K-FAC = [0.4, 0.05, 0]
    assert nll["max_abs"] == pytest.approx(0.4) and nll["at_scale"] == 0.1
    assert nll["diff"] == pytest.approx(0.4)
    assert nll["best_scale"] == 1.0 and nll["diff_at_best"] == pytest.approx(0.05)
    assert by_metric["ece"]["at_scale"] == 1.0 and by_metric["ece"]["max_abs"] == pytest.approx(
        0.01
    )
    assert by_metric["auroc"]["diff"] == pytest.approx(0.02)


def test_sweep_section_and_figure(tmp_path: Path) -> None:
    results = _synthetic_results()
    text = "\n".join(sweep_section(results))
    assert "K-FOC vs K-FAC, test NLL: largest |difference| 0.4000 at s = 0.1" in text
    assert "K-FAC better" in text and "K-FOC better" in text  # NLL / AUROC
    assert "figures/prior_sweep.png" in text and "0.2000 (1)" in text  # K-FAC's best NLL
    sweep_figure(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    no_ood = _synthetic_results(ood=False)
    text = "\n".join(sweep_section(no_ood))
    assert "no AUROC" in text and "AUROC, − entropy" not in text
    sweep_figure(no_ood, tmp_path / "no_ood.png")
    single = copy.deepcopy(no_ood)
    del single["prior_sweep"]["structures"]["kfac"]
    assert "nothing to compare" in "\n".join(sweep_section(single))
    assert sweep_section({"prior_sweep": None}) == []


def test_hyperparameter_table_shows_t_and_s() -> None:
    def seed(t: float, s: float) -> dict[str, Any]:
        hp = {"temperature": t, "prior_scale": s, "prior_precision": 10 * s}
        row = {"fit_seconds": 0.0, "tune_seconds": 0.0, "predict_seconds": 0.0}
        return {
            "map": {"seconds": 0.0, "cached": True},
            "methods": {"kfoc": {**row, "eval_seconds": 0.0, "hyperparameters": hp}},
        }

    results = {
        "methods": ["kfoc"],
        "seeds": [seed(1.2, 10.0), seed(1.4, 1000.0)],
        "timings": {"total_seconds": 1.0},
        "environment": {"threads": 1},
    }
    text = "\n".join(_timing_section(results))
    assert "| kfoc | T (mean ± sd) | 1.300 ± 0.141 |" in text
    assert "| kfoc | prior scale s of τ_b = s·P_b/‖θ_b‖² (geometric mean ×/÷ sd) | 100 ×/÷" in text


def test_logit_scores_in_the_evaluation() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 10)
    x, y = torch.rand(40, 64), torch.randint(0, 10, (40,))
    x_out = 3 * torch.rand(30, 64)

    @torch.no_grad()
    def logits(inputs: torch.Tensor) -> torch.Tensor:
        return lin(inputs)

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits(inputs), -1)

    fitted = FittedMethod("lin", predict, None, logits=logits)
    ev = evaluate_method(fitted, 0, (x, y), {"noise": x_out}, (), None, 2)
    scores = ev.ood["noise"]
    assert set(scores) == {"max_prob", "entropy", "energy", "max_logit"}
    expected = M.auroc(-M.energy(lin(x).detach()), -M.energy(lin(x_out).detach()))
    assert scores["energy"]["auroc"] == pytest.approx(expected)
    expected = M.auroc(M.max_logit(lin(x).detach()), M.max_logit(lin(x_out).detach()))
    assert scores["max_logit"]["auroc"] == pytest.approx(expected)
    no_logits = FittedMethod("probs-only", predict, None)
    ev = evaluate_method(no_logits, 0, (x, y), {"noise": x_out}, (), None, 2)
    assert set(ev.ood["noise"]) == {"max_prob", "entropy"}
    out = ood_scores(predict(x), None, logits(x))
    assert list(out) == ["max_prob", "entropy", "energy", "max_logit"]
