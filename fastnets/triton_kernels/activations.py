"""The fused activations in Triton (codes and semantics: fastnets/activations.py). `ACT` is a tl.constexpr,
so each kernel is compiled for the activation it runs and the other branches vanish; `param` is the one
float parameter (leaky_relu's negative_slope). Formulas restate aten's forward and backward kernels,
NaN handling and the gradient at each kink included; the comparisons are written so that NaN takes
torch's branch."""
import triton
import triton.language as tl

IDENTITY: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
RELU6: tl.constexpr = tl.constexpr(2)
LEAKY_RELU: tl.constexpr = tl.constexpr(3)
SILU: tl.constexpr = tl.constexpr(4)
HARDSWISH: tl.constexpr = tl.constexpr(5)
GELU: tl.constexpr = tl.constexpr(6)
GELU_TANH: tl.constexpr = tl.constexpr(7)


@triton.jit
def _tanh_parts(z):
    """(1 + tanh z, 1 - tanh z ** 2) from e = exp(-2|z|) (tl.math has no portable tanh across Triton
    3.1-3.8), both without cancellation: exact limits at +-inf, NaN stays NaN."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    one_plus_t = tl.where(z < 0, 2.0 * e / (1.0 + e), 1.0 + t)
    return one_plus_t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def act_fwd(v, ACT: tl.constexpr, param):
    if ACT == 1:  # relu: NaN stays NaN, as torch.relu
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 2:  # relu6 = hardtanh(0, 6), a NaN-propagating clamp
        v = tl.where(v < 0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == 3:  # leaky_relu: x > 0 ? x : x * slope
        v = tl.where(v > 0, v, v * param)
    elif ACT == 4:  # silu: x / (1 + exp(-x))
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 5:  # hardswish: x * clamp(x + 3, 0, 6) / 6 (-inf -> NaN, as torch)
        t = v + 3.0
        t = tl.where(t < 0, 0.0, tl.where(t > 6.0, 6.0, t))
        v = v * t / 6.0
    elif ACT == 6:  # gelu: x * Phi(x)
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 7:  # gelu, tanh approximation
        one_plus_t, _ = _tanh_parts(0.7978845608028654 * (v + 0.044715 * v * v * v))
        v = 0.5 * v * one_plus_t
    return v


@triton.jit
def act_grad(g, v, ACT: tl.constexpr, param):
    """g * act'(v) for the activations whose gradient needs the pre-activation v (not identity or relu,
    whose gradient comes from the output: see relu_grad)."""
    if ACT == 2:  # hardtanh_backward(0, 6): 0 at both kinks, grad for NaN
        g = tl.where((v <= 0) | (v >= 6.0), 0.0, g)
    elif ACT == 3:  # leaky_relu_backward: slope at 0 and for NaN
        g = tl.where(v > 0, g, g * param)
    elif ACT == 4:  # silu_backward: s * (1 + x * (1 - s))
        s = 1.0 / (1.0 + tl.exp(-v))
        g = g * s * (1.0 + v * (1.0 - s))
    elif ACT == 5:  # hardswish_backward: 0 for x <= -3, x / 3 + 0.5 for x < 3, 1 above and for NaN
        g = tl.where(v <= -3.0, 0.0, tl.where(v < 3.0, g * (v / 3.0 + 0.5), g))
    elif ACT == 6:  # gelu_backward: Phi(x) + x * phi(x)
        cdf = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
        pdf = tl.exp(-0.5 * v * v) * 0.3989422804014327
        g = g * (cdf + v * pdf)
    elif ACT == 7:  # gelu_backward(approximate='tanh')
        v2 = v * v
        one_plus_t, sech2 = _tanh_parts(0.7978845608028654 * (v + 0.044715 * v2 * v))
        right = 0.5 * v * sech2 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v2)
        g = g * (0.5 * one_plus_t + right)
    return g


@triton.jit
def relu_grad(g, y):
    # threshold_backward(grad, result, 0): 0 where the output is <= 0, grad elsewhere (NaN included)
    return tl.where(y <= 0, 0.0, g)
