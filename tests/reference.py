"""Float64 NumPy references of the update rules, written from the ``torch.optim`` docs.

Independent of optcore: each function takes the current parameter, gradient and state (any
float dtype, converted to float64), applies ONE step of the documented algorithm in float64
and returns ``(new_param, new_state)`` as fresh float64 arrays; nothing is modified in place.

Conventions shared by every rule (as the torch docs write them, with ``grad_scale`` added):

- ``g = grad_scale * grad``, negated when ``maximize`` (torch negates the gradient first, then
  adds weight decay);
- coupled weight decay: ``g = g + weight_decay * p``;
- decoupled weight decay (AdamW, NAdam ``decoupled_weight_decay``): ``p = p - lr * wd * p``
  before the rule, and ``g`` is left alone;
- ``step`` is 1-based.

Sources: the ``torch.optim`` class docstrings (SGD, Adagrad, RMSprop, Adam, AdamW, Adamax,
NAdam), which cite Sutskever et al. 2013, Duchi et al. 2011, Hinton's lecture 6e and
Graves 2013, Kingma & Ba 2015, Reddi et al. 2018, Loshchilov & Hutter 2019, Dozat 2016.
"""
import numpy as np

F64 = np.float64


def _f(x):
    return np.array(x, dtype=F64, copy=True)


def _grad(p, grad, *, weight_decay, maximize, grad_scale, decoupled=False, lr=0.0):
    """Return (p, g) after scaling, maximize and weight decay (coupled or decoupled)."""
    p = _f(p)
    g = _f(grad) * grad_scale
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled:
            p = p - lr * weight_decay * p
        else:
            g = g + weight_decay * p
    return p, g


def sgd(p, grad, state, *, step, lr, momentum=0.0, dampening=0.0, nesterov=False,
        weight_decay=0.0, maximize=False, grad_scale=1.0):
    """torch.optim.SGD: the buffer is initialised to ``g`` at the first step (no dampening)."""
    p, g = _grad(p, grad, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale)
    new = {}
    if momentum != 0:
        if step == 1:
            b = g.copy()
        else:
            b = momentum * _f(state["momentum_buffer"]) + (1.0 - dampening) * g
        new["momentum_buffer"] = b
        g = g + momentum * b if nesterov else b
    return p - lr * g, new


def adagrad(p, grad, state, *, step, lr, lr_decay=0.0, eps=1e-10, weight_decay=0.0,
            maximize=False, grad_scale=1.0):
    """torch.optim.Adagrad: ``state["sum"]`` starts at ``initial_accumulator_value``."""
    p, g = _grad(p, grad, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale)
    clr = lr / (1.0 + (step - 1) * lr_decay)
    s = _f(state["sum"]) + g * g
    return p - clr * g / (np.sqrt(s) + eps), {"sum": s}


def rmsprop(p, grad, state, *, lr, alpha=0.99, eps=1e-8, momentum=0.0, centered=False,
            weight_decay=0.0, maximize=False, grad_scale=1.0):
    """torch.optim.RMSprop (plain, centered, with momentum)."""
    p, g = _grad(p, grad, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale)
    v = alpha * _f(state["square_avg"]) + (1.0 - alpha) * g * g
    new = {"square_avg": v}
    vt = v
    if centered:
        ga = alpha * _f(state["grad_avg"]) + (1.0 - alpha) * g
        new["grad_avg"] = ga
        vt = v - ga * ga
    d = np.sqrt(vt) + eps
    if momentum > 0:
        b = momentum * _f(state["momentum_buffer"]) + g / d
        new["momentum_buffer"] = b
        return p - lr * b, new
    return p - lr * g / d, new


def adam(p, grad, state, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
         amsgrad=False, decoupled=False, maximize=False, grad_scale=1.0):
    """torch.optim.Adam / AdamW (``decoupled``), AMSGrad keeping the max of the raw ``v``."""
    p, g = _grad(p, grad, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                 decoupled=decoupled, lr=lr)
    m = beta1 * _f(state["exp_avg"]) + (1.0 - beta1) * g
    v = beta2 * _f(state["exp_avg_sq"]) + (1.0 - beta2) * g * g
    new = {"exp_avg": m, "exp_avg_sq": v}
    m_hat = m / (1.0 - beta1**step)
    if amsgrad:
        vmax = np.maximum(_f(state["max_exp_avg_sq"]), v)
        new["max_exp_avg_sq"] = vmax
        v_hat = vmax / (1.0 - beta2**step)
    else:
        v_hat = v / (1.0 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), new


def adamax(p, grad, state, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
           maximize=False, grad_scale=1.0):
    """torch.optim.Adamax: ``u = max(beta2 u, |g| + eps)``."""
    p, g = _grad(p, grad, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale)
    m = beta1 * _f(state["exp_avg"]) + (1.0 - beta1) * g
    u = np.maximum(beta2 * _f(state["exp_inf"]), np.abs(g) + eps)
    return p - lr * m / ((1.0 - beta1**step) * u), {"exp_avg": m, "exp_inf": u}


def nadam_mu(step, beta1, momentum_decay):
    """NAdam's momentum schedule ``mu_t = beta1 (1 - 0.5 * 0.96 ** (t psi))``."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def nadam(p, grad, state, *, step, mu_product, lr, beta1=0.9, beta2=0.999, eps=1e-8,
          weight_decay=0.0, momentum_decay=4e-3, decoupled=False, maximize=False,
          grad_scale=1.0):
    """torch.optim.NAdam; ``mu_product`` is prod_{i<t} mu_i (1 at the first step).

    Returns ``(new_param, new_state, new_mu_product)``.
    """
    p, g = _grad(p, grad, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                 decoupled=decoupled, lr=lr)
    mu = nadam_mu(step, beta1, momentum_decay)
    mu_next = nadam_mu(step + 1, beta1, momentum_decay)
    prod_t = mu_product * mu
    prod_next = prod_t * mu_next
    m = beta1 * _f(state["exp_avg"]) + (1.0 - beta1) * g
    v = beta2 * _f(state["exp_avg_sq"]) + (1.0 - beta2) * g * g
    m_hat = mu_next * m / (1.0 - prod_next) + (1.0 - mu) * g / (1.0 - prod_t)
    v_hat = v / (1.0 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), {"exp_avg": m, "exp_avg_sq": v}, prod_t


def initial_state(rule, shape, **h):
    """Fresh state of ``rule`` for a parameter of ``shape`` (float64 zeros, or Adagrad's
    ``initial_accumulator_value``)."""
    z = lambda: np.zeros(shape, F64)  # noqa: E731
    if rule == "sgd":
        return {"momentum_buffer": z()} if h.get("momentum", 0) != 0 else {}
    if rule == "adagrad":
        return {"sum": np.full(shape, h.get("initial_accumulator_value", 0.0), F64)}
    if rule == "rmsprop":
        s = {"square_avg": z()}
        if h.get("centered"):
            s["grad_avg"] = z()
        if h.get("momentum", 0) > 0:
            s["momentum_buffer"] = z()
        return s
    if rule == "adam":
        s = {"exp_avg": z(), "exp_avg_sq": z()}
        if h.get("amsgrad"):
            s["max_exp_avg_sq"] = z()
        return s
    if rule == "adamax":
        return {"exp_avg": z(), "exp_inf": z()}
    if rule == "nadam":
        return {"exp_avg": z(), "exp_avg_sq": z()}
    raise ValueError(rule)


def apply(rule, p, grad, state, *, step, h, mu_product=1.0, grad_scale=1.0):
    """One step of ``rule`` with hyper-parameters ``h`` (the names of ``optcore.kernels``
    plus ``amsgrad`` and ``initial_accumulator_value``); returns
    ``(new_param, new_state, new_mu_product)`` (``mu_product`` passes through unchanged for
    rules other than NAdam)."""
    h = {k: v for k, v in h.items() if k != "initial_accumulator_value"}
    if rule == "rmsprop":
        new_p, new_s = rmsprop(p, grad, state, grad_scale=grad_scale, **h)
    elif rule == "nadam":
        return nadam(p, grad, state, step=step, mu_product=mu_product, grad_scale=grad_scale, **h)
    else:
        new_p, new_s = RULES[rule](p, grad, state, step=step, grad_scale=grad_scale, **h)
    return new_p, new_s, mu_product


RULES = {"sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop, "adam": adam, "adamax": adamax,
         "nadam": nadam}
