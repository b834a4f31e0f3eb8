"""Named federated algorithms, each a short module on the public API (FedAvg's pieces and fedjax_tl.Hooks).

Server optimizers (:mod:`~fedjax_tl.algorithms.fedopt`): FedAvgM, FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021),
optax transforms of the pseudo-gradient. Client objective: FedProx (:mod:`~fedjax_tl.algorithms.fedprox`, Li et al.
2020), an optax transform chained before the client optimizer. Drift correction, as :class:`~fedjax_tl.Hooks`:
SCAFFOLD (:mod:`~fedjax_tl.algorithms.scaffold`, Karimireddy et al. 2020), FedDyn
(:mod:`~fedjax_tl.algorithms.feddyn`, Acar et al. 2021), FedNova (:mod:`~fedjax_tl.algorithms.fednova`, Wang et al.
2020), MimeLite (:mod:`~fedjax_tl.algorithms.mimelite`, Karimireddy et al. 2021). Clustering: IFCA
(:mod:`~fedjax_tl.algorithms.ifca`, Ghosh et al. 2020). Loss terms: MOON (:mod:`~fedjax_tl.algorithms.moon`, Li et
al. 2021), FedLC (:mod:`~fedjax_tl.algorithms.fedlc`, Zhang et al. 2022). Fairness: q-FFL
(:mod:`~fedjax_tl.algorithms.qffl`, Li et al. 2020). Personalization: FedPer, FedRep, FedBN
(:mod:`~fedjax_tl.algorithms.personal`), APFL (:mod:`~fedjax_tl.algorithms.apfl`, Deng et al. 2020) and Ditto
(:mod:`~fedjax_tl.algorithms.ditto`, Li et al. 2021).
"""

from fedjax_tl.algorithms.apfl import APFL
from fedjax_tl.algorithms.ditto import Ditto, DittoOnePass, DittoState
from fedjax_tl.algorithms.feddyn import FedDyn
from fedjax_tl.algorithms.fedlc import FedLC
from fedjax_tl.algorithms.fednova import FedNova
from fedjax_tl.algorithms.fedopt import (
  SERVER_OPTIMIZERS,
  AdaptiveState,
  fed_adagrad,
  fed_adam,
  fed_avgm,
  fed_yogi,
  fedopt,
  server_optimizer,
)
from fedjax_tl.algorithms.fedprox import ProxState, fedprox, proximal_term
from fedjax_tl.algorithms.ifca import IFCA
from fedjax_tl.algorithms.mimelite import MimeLite
from fedjax_tl.algorithms.moon import MOON
from fedjax_tl.algorithms.personal import BN_PARAMS, HeadThenBody, fedbn, fedper, fedrep
from fedjax_tl.algorithms.qffl import QFFL
from fedjax_tl.algorithms.scaffold import Scaffold

__all__ = ["SERVER_OPTIMIZERS", "AdaptiveState", "fed_adagrad", "fed_adam", "fed_avgm", "fed_yogi", "fedopt",
           "server_optimizer", "ProxState", "fedprox", "proximal_term",
           "Scaffold", "Ditto", "DittoOnePass", "DittoState",
           "FedDyn", "FedNova", "APFL", "IFCA", "MimeLite", "MOON", "FedLC", "QFFL", "fedper", "fedrep", "fedbn",
           "HeadThenBody", "BN_PARAMS"]
