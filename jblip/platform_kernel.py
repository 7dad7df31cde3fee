"""`per_platform(default, tpu=..., cuda=...)`: a platform choice for custom kernels.

`jax.lax.platform_dependent` is right for branches made of ordinary XLA ops (jblip's CPU
branches), but when one program is lowered for several platforms at once
(`jax.export(..., platforms=("tpu", "cuda"))`) it lowers every branch for every one of
them: a Pallas TPU kernel in the tpu branch then fails to lower for cuda ("Compiler
params for platform tpu cannot be used for gpu lowering"). Here each branch is traced to
a jaxpr and handed to one primitive whose lowering rule is registered per platform, so
JAX lowers each branch for its own platform only (and the others' rules for the rest).

Differentiation: a `jax.custom_vjp` whose backward pass is the same choice over the
branches' own VJPs (each recomputes its forward pass from the saved inputs, as remat).
Every branch takes the same flat array arguments; the first `num_diff` are differentiated.
"""
from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import mlir

KERNEL_PLATFORMS = ("cuda", "rocm", "tpu")

_per_platform_p = Primitive("jblip_per_platform")
_per_platform_p.multiple_results = True


def _pick(branches, default, platform):
    return dict(branches).get(platform, default)


@_per_platform_p.def_abstract_eval
def _abstract_eval(*avals, branches, default):
    return default.out_avals


@_per_platform_p.def_impl
def _impl(*args, branches, default):  # eager calls: compile for the device they run on
    return jax.jit(functools.partial(_per_platform_p.bind, branches=branches, default=default))(*args)


def _rule_for(platform):
    def run(*args, branches, default):
        return jaxpr_as_fun(_pick(branches, default, platform))(*args)
    return mlir.lower_fun(run, multiple_results=True)


mlir.register_lowering(_per_platform_p, _rule_for(None))
for _platform in KERNEL_PLATFORMS:
    mlir.register_lowering(_per_platform_p, _rule_for(_platform), platform=_platform)


def _bind(default, branches: dict, args):
    trace = lambda fn: jax.make_jaxpr(lambda *a: tuple(fn(*a)))(*args)
    out = _per_platform_p.bind(*args, default=trace(default),
                               branches=tuple((p, trace(fn)) for p, fn in sorted(branches.items())))
    return tuple(out)


def per_platform(default, num_diff: int, **branches):
    """A function of flat arrays returning a tuple of arrays: `branches[platform]` in the program
    compiled for that platform, `default` elsewhere. Differentiable in its first `num_diff` args."""
    unknown = set(branches) - set(KERNEL_PLATFORMS)
    if unknown:
        raise ValueError(f"per_platform: no kernel platform {sorted(unknown)}; use {KERNEL_PLATFORMS}")

    @jax.custom_vjp
    def call(*args):
        return _bind(default, branches, args)

    def fwd(*args):
        return call(*args), args

    def bwd(args, cotangents):
        n = len(args)

        def vjp_of(fn):
            def run(*args_and_cotangents):
                primal, cts = args_and_cotangents[:n], args_and_cotangents[n:]
                _, pullback = jax.vjp(lambda *diff: fn(*diff, *primal[num_diff:]), *primal[:num_diff])
                return pullback(tuple(cts))
            return run
        grads = _bind(vjp_of(default), {p: vjp_of(fn) for p, fn in branches.items()}, tuple(args) + tuple(cotangents))
        return tuple(grads) + (None,) * (n - num_diff)

    call.defvjp(fwd, bwd)
    return call
