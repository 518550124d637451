"""``bayesian_model``: a trained classifier as a Pyro model with Gaussian priors on its weights.

The model is ``model(x, y=None)``:

- every parameter of the network is a :class:`pyro.nn.PyroSample` site named exactly as in
  ``net.named_parameters()`` (``"0.weight"``, ``"features.3.bias"``, ...), with the prior
  ``N(0, 1/τ)`` (``τ`` on the **summed**-log-likelihood scale, as in :class:`~bayes_kfoc.Laplace`),
  declared with ``.to_event(param.ndim)`` so the site's event shape is the parameter's shape;
- the likelihood is ``Categorical(logits=f(x, θ))`` at site ``"obs"`` under
  ``pyro.plate("data", ..., dim=-1)`` (which supports subsampling), and the logits and
  probabilities are recorded as deterministic sites ``"logits"`` and ``"probs"`` (event shape
  ``[C]``).

The network is evaluated functionally (``torch.func.functional_call`` on a private copy whose
parameters are buffers holding the MAP ``θ*``), so parameter values with leading *particle*
dimensions, as ``Predictive(parallel=True)`` and vectorised ELBO particles produce, are evaluated
under ``torch.func.vmap`` and give logits ``[*particles, B, C]``.

With ``linearized=True`` the forward is the first-order expansion around the MAP,
``f(x, θ*) + J(x)(θ − θ*)``, computed as one Jacobian-vector product (``torch.func.jvp``) per
particle; no Jacobian is formed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from ..laplace import PriorPrecision, architecture, check_architecture
from ._prior import owner, resolve_prior_precision

if TYPE_CHECKING:
    from ..laplace import Laplace

__all__ = ["BayesianClassifier", "bayesian_model"]

PRIOR_BUFFER_SUFFIX = "_prior_precision"


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


def _get_path(root: nn.Module, name: str) -> Any:
    obj: Any = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _params_to_buffers(module: nn.Module) -> None:
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                del m._parameters[name]
                m.register_buffer(name, p.detach().clone())


class BayesianClassifier(nn.Module):
    """A Pyro model ``model(x, y=None)`` over the weights of a classifier; see
    :func:`bayesian_model` (which builds it) for the sites and conventions.

    Attributes:
        net: the prior network, a :class:`pyro.nn.PyroModule` copy of the classifier whose
            parameters are :class:`pyro.nn.PyroSample` sites (the user's module unless
            ``inplace=True``). Calling ``model.net(x)`` draws the weights from the prior.
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
        super().__init__()
        if any(isinstance(m, PyroModule) for m in net.modules()):
            raise TypeError(
                "bayesian_model: the network is already a PyroModule; for a user-written Pyro "
                "model use LaplaceGuide.from_model(model, train_loader)."
            )
        if num_data is not None and subsample_size is not None:
            raise ValueError(
                "bayesian_model: pass num_data (x is a mini-batch of a data set of that size) or "
                "subsample_size (subsample x in every call), not both."
            )
        self.param_names = [k for k, _ in net.named_parameters()]
        self.param_shapes = {k: tuple(p.shape) for k, p in net.named_parameters()}
        self.prior_precision = dict(prior_precision)
        self.linearized = bool(linearized)
        self.num_data = num_data
        self.subsample_size = subsample_size

        map_net = copy.deepcopy(net).eval()
        _params_to_buffers(map_net)
        prior_net = (net if inplace else copy.deepcopy(net)).eval()
        owners = {k: owner(k) for k in self.param_names}
        ref = {k: p for k, p in prior_net.named_parameters()}
        to_pyro_module_(prior_net)
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
        self.map_net = map_net

    # -- parameters -----------------------------------------------------------------------------
    def map_parameters(self) -> dict[str, Tensor]:
        """``{param_name: θ*}``: the MAP the model was built at (and linearised around)."""
        bufs = dict(self.map_net.named_buffers())
        return {k: bufs[k] for k in self.param_names}

    def sample_parameters(self) -> dict[str, Tensor]:
        """One ``pyro.sample`` per parameter (its PyroSample site), ``{param_name: value}``."""
        net = self.net
        assert isinstance(net, PyroModule)
        # The prior network's own PyroModule context: site names are ``named_parameters`` names
        # and each site is sampled once per call.
        with net._pyro_context:
            return {k: _get_path(net, k) for k in self.param_names}

    def _lead(self, name: str, value: Tensor) -> torch.Size:
        """The leading dims of one site's value, trailing singletons (the data plate's slot)
        dropped."""
        shape = self.param_shapes[name]
        if value.ndim < len(shape) or tuple(value.shape[value.ndim - len(shape) :]) != shape:
            raise ValueError(
                f"BayesianClassifier: site {name!r} has a value of shape {tuple(value.shape)}, "
                f"but the parameter has shape {shape}."
            )
        lead = list(value.shape[: value.ndim - len(shape)])
        while lead and lead[-1] == 1:
            lead.pop()
        return torch.Size(lead)

    def _particle_shape(self, params: Mapping[str, Tensor]) -> torch.Size:
        """The leading (particle) dims of the sampled parameters.

        ``Predictive(parallel=True)`` gives values ``[S, *shape]`` or ``[S, 1, *shape]`` and
        vectorised ELBO particles ``[P, 1, *shape]``; trailing singleton dims are the slot of the
        data plate (dim ``-1``) and are dropped, so the logits are ``[*particles, B, C]``.
        """
        leads = [self._lead(k, v) for k, v in params.items()]
        try:
            return torch.broadcast_shapes(*leads)
        except RuntimeError as err:
            raise ValueError(
                "BayesianClassifier: sampled parameters have incompatible leading (particle) "
                f"shapes {sorted({tuple(s) for s in leads})}."
            ) from err

    # -- the network ------------------------------------------------------------------------------
    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``[*particles, B, C]`` logits at parameter values with optional leading particle dims.

        Non-linearised: ``f(x, θ)``. Linearised: ``f(x, θ*) + J(x)(θ − θ*)`` via ``jvp``.
        """
        lead = self._particle_shape(params)
        theta_star = self.map_parameters()
        net = self.map_net

        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(net, p, (x,))

        def forward(p: dict[str, Tensor]) -> Tensor:
            if not self.linearized:
                return f(p)
            tangent = {k: p[k] - theta_star[k] for k in self.param_names}
            out, dout = jvp(f, (theta_star,), (tangent,))[:2]
            return out + dout

        if not lead:
            return forward({k: v.reshape(self.param_shapes[k]) for k, v in params.items()})
        flat = {
            k: v.reshape(*self._lead(k, v), -1).expand(*lead, -1).reshape(-1, *self.param_shapes[k])
            for k, v in params.items()
        }
        out = vmap(forward)(flat)
        return out.reshape(*lead, *out.shape[1:])

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The generative model; returns the logits ``[*particles, B, C]`` of the (sub)batch."""
        params = self.sample_parameters()
        n = x.shape[0]
        if self.subsample_size is not None:
            plate = pyro.plate("data", n, subsample_size=self.subsample_size, dim=-1)
        elif self.num_data is not None:
            plate = pyro.plate(
                "data", self.num_data, subsample=torch.arange(n, device=x.device), dim=-1
            )
        else:
            plate = pyro.plate("data", n, dim=-1)
        with plate as idx:
            if self.subsample_size is not None:
                assert idx is not None
                x = x[idx.to(x.device)]
                y = None if y is None else y[idx.to(y.device)]
            logits = self.logits(params, x)
            pyro.deterministic("logits", logits, event_dim=1)
            pyro.deterministic("probs", torch.softmax(logits, dim=-1), event_dim=1)
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def bayesian_model(
    net: nn.Module,
    prior_precision: PriorPrecision | None = 1.0,
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
            ``la.prior_precision_dict()`` instead). ``None``: take ``laplace.prior_precision``.
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
