"""⊥AdamW: AdamW fed with ⊥Grad's projected gradients.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical
Stability" (ICLR 2025), https://arxiv.org/abs/2501.04697.
"""

from __future__ import annotations

import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms.orthogonal_grad import orthogonal_grad


def perp_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    r"""⊥AdamW (Prieto et al., 2025): AdamW on the gradient with its radial part removed.

    For every parameter tensor :math:`w` with gradient :math:`g` (both
    flattened), :func:`~jaxopt_lab.transforms.orthogonal_grad.orthogonal_grad`
    gives

    .. math::
        g_\perp = g - \frac{w^\top g}{w^\top w}\, w, \qquad
        \tilde g = g_\perp \frac{\lVert g\rVert}{\lVert g_\perp\rVert},

    (up to ⊥Grad's tiny ``eps`` in the denominators), and :func:`optax.adamw` steps on :math:`\tilde g`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g_t^2,\quad
        \theta_t = \theta_{t-1} - \eta_t\Bigl(\frac{\hat m_t}{\sqrt{\hat v_t}+\epsilon}
                   + \lambda\theta_{t-1}\Bigr),

    with optax's conventions (bias-corrected :math:`\hat m_t, \hat v_t`,
    :math:`\epsilon` outside the square root, decay :math:`\lambda` multiplied by
    :math:`\eta_t` and applied to every parameter). The weight decay is not
    projected. It is
    ``optax.chain(orthogonal_grad(), optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay))``.

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or an optax schedule.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: :math:`\epsilon` >= 0.
      weight_decay: :math:`\lambda` >= 0 (default 0: ⊥Grad followed by Adam).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.non_negative("learning_rate", learning_rate)
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)
    check.non_negative("weight_decay", weight_decay)
    return optax.chain(
        orthogonal_grad(),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )
