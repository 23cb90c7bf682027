"""The shared RL objective library: pure tensor functions for post-training, chosen by registered name.

Depends on torch only and imports nothing else from diffa2, so another project can vendor this folder unchanged.
Formulas, defaults and sources: `README.md` beside this file and each module's docstrings.

Registries (`get_*` raises a `ValueError` listing valid names; re-registering a name to another function raises;
`REGISTRY.note(name)` is a name's provenance note, e.g. `reconstructed(...)` for hian, gtpo and scope):

- `get_policy_loss(name)`: per-token policy losses (`policy.py`).
- `get_aggregation(name)` / `agg_loss`: loss reductions (`aggregation.py`).
- `get_kl_estimator(name)`: k1, k2, k3 and straight-through variants (`kl.py`).
- `get_preference_loss(name)`: DPO, IPO, SimPO, VRPO (`preference.py`).
- `get_advantage_estimator(name)`: GRPO, RLOO, dual-track, HIAN, GTPO, OPD, SCOPE, DynaMO.
- `get_likelihood_estimator(name)`: ELBO, d1 one-step, SPG bounds for diffusion LMs (`elbo.py`, `d1.py`, `spg.py`).
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageOutput,
    AdvantageTrack,
    DrGRPOAdvantageConfig,
    DualTrackConfig,
    GRPOAdvantageConfig,
    RLOOConfig,
    get_advantage_estimator,
    register_advantage_estimator,
)
from .aggregation import AGGREGATIONS, Normalisers, agg_loss, get_aggregation, masked_mean, register_aggregation
from .d1 import D1Estimator
from .distillation import OPDConfig, SCOPEConfig
from .dynamo import DynaMOConfig, dynamo_allocate_rollouts, dynamo_priority
from .elbo import (
    LIKELIHOOD_ESTIMATORS,
    MASKING_FORMS,
    BatchedTokenLogprobFn,
    ElboDraws,
    ElboEstimator,
    ElboPair,
    LikelihoodEstimator,
    MaskingForm,
    TokenLogprobFn,
    batched_token_logprobs,
    elbo_from_token_logprobs,
    elbo_terms,
    get_likelihood_estimator,
    masking_form,
    paired_elbo,
    register_likelihood_estimator,
    sample_elbo_draws,
    token_logprobs,
)
from .kl import KL_ESTIMATORS, get_kl_estimator, register_kl_estimator
from .policy import (
    POLICY_LOSSES,
    CEGPPOConfig,
    CISPOConfig,
    DAPOLossConfig,
    DGPOConfig,
    DrGRPOLossConfig,
    GPPOConfig,
    GRPOLossConfig,
    GSPOConfig,
    MASPOConfig,
    PPOClipConfig,
    SAPOConfig,
    get_policy_loss,
    register_policy_loss,
)
from .preference import (
    PREFERENCE_LOSSES,
    DPOConfig,
    IPOConfig,
    SimPOConfig,
    VRPOConfig,
    get_preference_loss,
    preference_metrics,
    register_preference_loss,
)
from .registry import FunctionRegistry, RegisteredFn, Registry, reconstructed
from .spg import SPGEstimator
from .turns import GTPOConfig, HIANConfig

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LIKELIHOOD_ESTIMATORS",
    "MASKING_FORMS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "AdvantageInputs",
    "AdvantageOutput",
    "AdvantageTrack",
    "BatchedTokenLogprobFn",
    "CEGPPOConfig",
    "CISPOConfig",
    "D1Estimator",
    "DAPOLossConfig",
    "DGPOConfig",
    "DPOConfig",
    "DrGRPOAdvantageConfig",
    "DrGRPOLossConfig",
    "DualTrackConfig",
    "DynaMOConfig",
    "ElboDraws",
    "ElboEstimator",
    "ElboPair",
    "FunctionRegistry",
    "GPPOConfig",
    "GRPOAdvantageConfig",
    "GRPOLossConfig",
    "GSPOConfig",
    "GTPOConfig",
    "HIANConfig",
    "IPOConfig",
    "LikelihoodEstimator",
    "MASPOConfig",
    "MaskingForm",
    "Normalisers",
    "OPDConfig",
    "PPOClipConfig",
    "RLOOConfig",
    "RegisteredFn",
    "Registry",
    "SAPOConfig",
    "SCOPEConfig",
    "SPGEstimator",
    "SimPOConfig",
    "TokenLogprobFn",
    "VRPOConfig",
    "agg_loss",
    "batched_token_logprobs",
    "dynamo_allocate_rollouts",
    "dynamo_priority",
    "elbo_from_token_logprobs",
    "elbo_terms",
    "get_advantage_estimator",
    "get_aggregation",
    "get_kl_estimator",
    "get_likelihood_estimator",
    "get_policy_loss",
    "get_preference_loss",
    "masked_mean",
    "masking_form",
    "paired_elbo",
    "preference_metrics",
    "reconstructed",
    "register_advantage_estimator",
    "register_aggregation",
    "register_kl_estimator",
    "register_likelihood_estimator",
    "register_policy_loss",
    "register_preference_loss",
    "sample_elbo_draws",
    "token_logprobs",
]
