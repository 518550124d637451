"""``bayesian_model``: a trained classifier as a Pyro model with Gaussian priors on its weights.

The model is ``model(x, y=None)``:

- every trainable parameter of the network is a :class:`pyro.nn.PyroSample` site named exactly
  as in ``net.named_parameters()`` (``"0.weight"``, ``"features.3.bias"``, ...; frozen ones,
  ``requires_grad=False``, e.g. the base of a LoRA model, stay fixed), with the prior
  ``N(0, 1/τ)`` (``τ`` on the **summed**-log-likelihood scale, as in :class:`~bayes_kfoc.Laplace`),
  declared with ``.to_event(param.ndim)`` so the site's event shape is the parameter's shape;
- the likelihood is ``Categorical(logits=f(x, θ))`` at site ``"obs"`` under
  ``pyro.plate("data", ..., dim=-1)`` (which supports subsampling), and the logits and
  probabilities are recorded as deterministic sites ``"logits"`` and ``"probs"`` (event shape
  ``[C]``).

The network is evaluated functionally (:class:`~bayes_kfoc.pyro._functional.FunctionalNetwork`:
``torch.func.functional_call`` on a private copy whose parameters are buffers holding the MAP
``θ*``), so parameter values with leading *particle* dimensions, as ``Predictive(parallel=True)``
and vectorised ELBO particles produce, are evaluated under ``torch.func.vmap`` and give logits
``[*particles, B, C]``.

With ``linearized=True`` the forward is the first-order expansion around the MAP,
``f(x, θ*) + J(x)(θ − θ*)``, computed as one Jacobian-vector product (``torch.func.jvp``) per
particle; no Jacobian is formed.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn

from ..laplace import PriorPrecision, architecture, check_architecture
from ._functional import PRIOR_BUFFER_SUFFIX, ClassifierModel, FunctionalNetwork
from ._prior import owner, resolve_prior_precision

if TYPE_CHECKING:
    from ..laplace import Laplace

__all__ = ["BayesianClassifier", "bayesian_model"]


class GaussianPrior:
    """The prior of one parameter, ``N(0, 1/τ)`` over its full shape (a PyroSample callable).

    ``τ`` is read from the buffer ``<param>_prior_precision`` of the owning module, so the prior
    follows the module across ``.to(device)`` and ``state_dict``.
    """

    def __init__(self, param: str, shape: tuple[int, ...]) -> None:
        self.param = param
        self.shape = tuple(shape)

    def __call__(self, module: nn.Module) -> dist.TorchDistribution:
        tau = getattr(module, self.param + PRIOR_BUFFER_SUFFIX)
        scale = tau.rsqrt()
        prior = dist.Normal(torch.zeros_like(scale), scale).expand(self.shape)
        return prior.to_event(len(self.shape))


def _pyro_convertible(net: nn.Module) -> bool:
    """Whether ``to_pyro_module_`` can convert every module of ``net``: Pyro mixes
    :class:`~pyro.nn.PyroModule` into each class, which fails for a class with a metaclass of
    its own (``ABCMeta``, as peft's tuner layers have)."""
    return all(type(type(m)) is type for m in net.modules())


def _prior_sites(owners: dict[str, tuple[str, str]]) -> PyroModule:
    """A :class:`~pyro.nn.PyroModule` tree that mirrors only the modules owning the parameters
    (same dotted names, no forward): it holds the prior sites of a network that Pyro cannot
    convert, so the sites keep the ``named_parameters`` names."""
    root = PyroModule()
    for mod_name, _ in owners.values():
        node = root
        for part in mod_name.split(".") if mod_name else []:
            child = node._modules.get(part)
            if child is None:
                child = PyroModule()
                node.add_module(part, child)
            node = child  # type: ignore[assignment]
    return root


def _get_path(root: nn.Module, name: str) -> Any:
    obj: Any = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class BayesianClassifier(ClassifierModel):
    """A Pyro model ``model(x, y=None)`` over the weights of a classifier; see
    :func:`bayesian_model` (which builds it) for the sites and conventions.

    Attributes:
        net: the prior network, a :class:`pyro.nn.PyroModule` copy of the classifier whose
            parameters are :class:`pyro.nn.PyroSample` sites (the user's module unless
            ``inplace=True``). Calling ``model.net(x)`` draws the weights from the prior.
            Where Pyro cannot convert the network's classes (a class with a metaclass of its
            own, such as peft's ``ABCMeta`` tuner layers), ``net`` is a ``PyroModule`` tree
            that mirrors only the modules owning parameters: the prior sites and their names
            are the same, but it has no forward of its own.
        map_net: a private copy of the classifier with its parameters as buffers holding the
            MAP ``θ*``; the forward evaluates it functionally at the sampled weights.
        prior_precision: ``{param_name: τ}``.
        linearized: whether the forward is linearised around ``θ*``.
        num_data: the data set size when ``x`` is a mini-batch (likelihood scale ``N/B``).
        subsample_size: draw a random subsample of this size of ``x`` in every call.
    """

    def __init__(
        self,
        net: nn.Module,
        prior_precision: dict[str, float],
        *,
        linearized: bool = False,
        inplace: bool = False,
        num_data: int | None = None,
        subsample_size: int | None = None,
    ) -> None:
        if any(isinstance(m, PyroModule) for m in net.modules()):
            raise TypeError(
                "bayesian_model: the network is already a PyroModule; for a user-written Pyro "
                "model use guide = LaplaceGuide.from_model(model, train_loader), and "
                "guide.network_model(linearized=True) for its linearised (GLM) model."
            )
        names = [k for k, p in net.named_parameters() if p.requires_grad]  # frozen: fixed
        if not names:
            raise ValueError(
                "bayesian_model: every parameter of the network is frozen (requires_grad=False); "
                "there is nothing to put a prior on."
            )
        functional = FunctionalNetwork(net, names, linearized=linearized)
        super().__init__(functional, num_data=num_data, subsample_size=subsample_size)
        self.prior_precision = dict(prior_precision)
        owners = {k: owner(k) for k in self.param_names}
        ref = dict(net.named_parameters())  # shapes, dtypes and devices of the priors
        prior_net: nn.Module
        if _pyro_convertible(net):
            prior_net = (net if inplace else copy.deepcopy(net)).eval()
            to_pyro_module_(prior_net)
        else:  # e.g. peft's tuner classes carry ABCMeta, which PyroModule cannot be mixed into
            prior_net = _prior_sites(owners)
        modules = dict(prior_net.named_modules())
        for k in self.param_names:
            mod_name, pname = owners[k]
            module = modules[mod_name]
            buf = pname + PRIOR_BUFFER_SUFFIX
            if hasattr(module, buf):
                raise ValueError(f"bayesian_model: module {mod_name!r} already has {buf!r}.")
            p = ref[k]
            module.register_buffer(
                buf, torch.tensor(self.prior_precision[k], dtype=p.dtype, device=p.device)
            )
            setattr(module, pname, PyroSample(GaussianPrior(pname, tuple(p.shape))))
        self.net = prior_net

    def sample_parameters(self) -> dict[str, Tensor]:
        """One ``pyro.sample`` per parameter (its PyroSample site), ``{param_name: value}``."""
        net = self.net
        assert isinstance(net, PyroModule)
        # The prior network's own PyroModule context: site names are ``named_parameters`` names
        # and each site is sampled once per call.
        with net._pyro_context:
            return {k: _get_path(net, k) for k in self.param_names}


def bayesian_model(
    net: nn.Module,
    prior_precision: PriorPrecision | None = None,
    *,
    laplace: Laplace | None = None,
    linearized: bool = False,
    inplace: bool = False,
    default_prior_precision: float | None = None,
    num_data: int | None = None,
    subsample_size: int | None = None,
) -> BayesianClassifier:
    """Turn a trained classifier into a Pyro model ``model(x, y=None)`` (see the module docs).

    Args:
        net: the trained classifier (logits ``[B, C]``). It is deep-copied and left untouched,
            unless ``inplace=True`` (then it is converted to a PyroModule with PyroSample
            weights). Its current parameters are the MAP ``θ*``. It is evaluated in eval mode.
        prior_precision: ``τ`` of the prior ``N(0, 1/τ)``, on the **summed** log-likelihood scale:
            a scalar; a dict keyed by parameter name (``"0.weight"``) or module name (``"0"``),
            a parameter name taking precedence; or a tensor with one value per block, in the
            block order of ``laplace`` (``la.prior_precision``), which then must be given: the
            block order is the posterior's forward-call order, which the network alone does not
            determine, so a per-block tensor without ``laplace=`` raises (pass
            ``la.prior_precision_dict()`` instead). ``None`` (default): take
            ``laplace.prior_precision``, or ``τ = 1`` without ``laplace``.
        laplace: the fitted :class:`~bayes_kfoc.Laplace` whose block order a tensor
            ``prior_precision`` follows; its MAP must equal the network's weights.
        linearized: make the forward ``f(x, θ*) + J(x)(θ − θ*)`` (the GLM of the Laplace
            predictive). See the notebook's "which predictive" section: for an all-weights
            posterior the linearised model is the one that matches the Laplace predictive;
            sampling weights through the nonlinear network underfits. For last-layer posteriors
            the network is linear in the random weights and both agree exactly.
        inplace: convert ``net`` itself instead of a copy.
        default_prior_precision: ``τ`` for parameters not named in a dict or outside the Laplace
            subset (they are Delta at the MAP in :class:`LaplaceGuide`; their prior only shifts
            the ELBO by a constant).
        num_data: the size of the full data set when the model is called on mini-batches
            (the likelihood is scaled by ``num_data / B``).
        subsample_size: subsample ``x`` (and ``y``) to this size in every call.

    Returns:
        A :class:`BayesianClassifier` (an ``nn.Module``: ``.to(device)`` moves priors and MAP).
    """
    if laplace is not None:
        _check_laplace_matches(net, laplace)
    tau = resolve_prior_precision(net, prior_precision, laplace, default_prior_precision)
    return BayesianClassifier(
        net,
        tau,
        linearized=linearized,
        inplace=inplace,
        num_data=num_data,
        subsample_size=subsample_size,
    )


def _check_laplace_matches(net: nn.Module, laplace: Laplace) -> None:
    if not laplace.fitted:
        raise RuntimeError(
            "bayesian_model: laplace= is not fitted (it has no posterior blocks and no MAP yet); "
            "call la.fit(train_loader) first."
        )
    check_architecture(
        architecture(laplace.model),
        net,
        "bayesian_model",
        "Build the model from the network the posterior was fitted on.",
    )
    current = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    map_vector = laplace.map_vector.to(current)
    if not torch.allclose(current, map_vector):
        raise ValueError(
            "bayesian_model: the network's weights differ from the Laplace MAP (la.map_vector); "
            "build the model from the network the posterior was fitted on."
        )
