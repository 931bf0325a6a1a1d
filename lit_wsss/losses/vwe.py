"""VWE core: visual-word encoding, HSPP, the three classification losses and the VWL codebook options.

Pure functions of tensors (batch-first, no module state), reimplemented from ../shared/methods/vwe.md §2
(forward pass, losses, gradient routing), §5 (hyper-parameters), §7 (VWL options) and §8 (pitfalls); tests
follow §10 items 1-5 and 8. The heads themselves (the 1x1 convolutions W_cls, W_a, W_b) are the module's
(:meth:`lit_wsss.modules.VWE.head_outputs`); :func:`vwe_losses` takes their outputs. CAM inference (§3) is
the shared :func:`lit_wsss.cams.multiscale_cams` with VWE's max flip fusion. Shapes: ``B`` images, ``C``
foreground classes, ``D`` feature channels, ``K`` words, ``(h, w)`` the feature map of the last stage::

    f2     = stage2(stage1(x)).detach()                      the module: frozen stem..layer2 (§2, P3; not memory_bank)
    F      = stage4(stage3(f2))                               (B, D, h, w)
    z      = [g GAP(F) + sum_s mean_cells(MaxPool_{k=floor(h/s)}(F))] / (g + |L|)   hspp (§2, P6)
    p_img  = W_cls z                                          L1 = MLSM(p_img, y)
    S      = softmax_K( cos(codebook_k, sg(F)) / T )          word_assignment (§2, P3, P5)
    hist   = sum_{i,j} S                                      word_histogram  (a SUM, P4)
    p_w2i  = W_a hist                                         L2 = MLSM(p_w2i, y)
    y_word = 1[k is the argmax of S at >= 1 pixel]            word_labels (no gradient, P10)
    p_word = W_b GAP(F)                                       L3 = MLSM(p_word, y_word)
    L      = L1 + L2 + L3                                     (ijcai, all weights 1, §5)
           + 1.0 L_decov,  L_decov = 0.5 (||Cov||_F - ||diag Cov||_2),  Cov = Dc Dc^T   (learned_v2, §7a)
    L      = L1 + L3, codebook <- rho M + (1 - rho) codebook (hard-assignment EMA)     (memory_bank, §7b)

    CAM    = relu(W_cls F); per scale max(A, flip(A_flipped)); sum over scales;
             keep label channels; / (max + 1e-5); background = constant bkgscore plane    (§3, §4, P7)

Gradient routing (§2, P3): L1 -> W_cls and F; L2 -> codebook and W_a only (F is detached inside
:func:`word_assignment`); L3 -> W_b and F (``y_word`` carries no gradient). The detach after stage 2 is
the module's (:class:`lit_wsss.modules.VWE` freezes stem..layer2). Labels are the batch convention of the
datamodules: ``(B, C)`` multi-hot over the FOREGROUND classes (VWE has no background class in training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_wsss.losses.common import as_matrix
from lit_wsss.precision import float32

#: Codebook size (vwe.md §5; ``Net(k_words=256)``).
NUM_WORDS = 256
#: HSPP weight of the global average (vwe.md §2, §5).
HSPP_GAMMA = 2.0
#: HSPP pyramid levels (vwe.md §2, §5).
HSPP_LEVELS: tuple[int, ...] = (1, 2, 4)
#: Temperature of the softmax over the cosines (vwe.md §5, P5: plain softmax).
WORD_TEMPERATURE = 1.0
#: Negative slope of the codebook's ``kaiming_normal_`` init (vwe.md §5; std = 1/sqrt(3 D)).
CODEBOOK_INIT_A = math.sqrt(5.0)
#: Codebook strategies (vwe.md §7).
STRATEGIES: tuple[str, ...] = ("ijcai", "learned_v2", "memory_bank")
#: Loss weights (vwe.md §5, §7a). ``ent`` is computed but has weight 0 in the released v2 code.
LOSS_WEIGHTS: dict[str, float] = {"img": 1.0, "w2i": 1.0, "word": 1.0, "decov": 1.0, "ent": 0.0}
#: EMA rate of the memory-bank codebook (vwe.md §7b: v2/train_cam_mbk.py; 0.01 is dead code).
MEMORY_BANK_RHO = 1e-3
#: Constant added to the per-word pixel count of the memory-bank mean (vwe.md §7b).
MEMORY_BANK_EPS = 1e-4
#: Inference scales (vwe.md §3, §5).
CAM_SCALES: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
#: Added to the per-class spatial max before normalising the CAMs (vwe.md §3).
CAM_NORM_EPS = 1e-5
#: Constant background score of the CAM evaluation (vwe.md §4, §5): IJCAI config and v2 config.
BKG_SCORE = 0.14
BKG_SCORE_V2 = 0.13
#: Flip fusions at inference (vwe.md §3, P7): ``max`` is VWE's, ``sum`` is IRN's.
FLIP_FUSIONS: tuple[str, ...] = ("max", "sum")


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _check_features(features: Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, h, w), got {tuple(features.shape)}")


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown codebook strategy {strategy!r}; expected one of {STRATEGIES}")


# ----------------------------------------------------------------------------------------------------
# Hybrid spatial pyramid pooling (§2, P6)
# ----------------------------------------------------------------------------------------------------


def hspp(
    features: Tensor,
    gamma: float = HSPP_GAMMA,
    levels: Sequence[int] = HSPP_LEVELS,
    adaptive_cells: bool = False,
) -> Tensor:
    """Hybrid spatial pyramid pooling of the FEATURES (vwe.md §2, P6; training only).

    ``[gamma GAP(F) + sum_{s in levels} mean_cells(MaxPool(F))] / (gamma + |levels|)``. Official rule
    (default): kernel ``(floor(h/s), floor(w/s))``, stride = kernel, no padding, so the grid has
    ``floor(h / floor(h/s))`` cells per side (can exceed ``s``) and leftover rows/columns are dropped.
    ``adaptive_cells=True`` uses an exact ``s x s`` adaptive max pooling instead (covers every pixel; equal
    to the official rule when ``s`` divides ``h`` and ``w``).

    Args:
        features: ``(B, D, h, w)``.
        gamma: weight of the global average.
        levels: pyramid levels ``s``.
        adaptive_cells: see above.

    Returns:
        ``(B, D)`` pooled features (the official ``(B, D, 1, 1)`` flattened).
    """
    _check_features(features)
    h, w = features.shape[-2:]
    if len(levels) == 0 or min(levels) < 1:
        raise ValueError(f"levels must be positive integers, got {tuple(levels)}")
    if not adaptive_cells and max(levels) > min(h, w):
        raise ValueError(f"feature map {h}x{w} is smaller than pyramid level {max(levels)}")
    total = gamma * features.mean(dim=(-2, -1))
    for s in levels:
        if adaptive_cells:
            cells = F.adaptive_max_pool2d(features, (s, s))
        else:
            kernel = (h // s, w // s)
            cells = F.max_pool2d(features, kernel_size=kernel, stride=kernel, padding=0)
        total = total + cells.mean(dim=(-2, -1))
    return total / (gamma + len(levels))


# ----------------------------------------------------------------------------------------------------
# Visual word encoder (§2, §5, P3-P5, P10)
# ----------------------------------------------------------------------------------------------------


def init_codebook(
    num_words: int = NUM_WORDS, dim: int = 2048, generator: torch.Generator | None = None
) -> Tensor:
    """Initial codebook: ``kaiming_normal_(a=sqrt 5)`` on a ``(K, D, 1, 1)`` tensor (vwe.md §5).

    Fan-in ``D``, gain ``sqrt(2 / (1 + 5))``, hence std ``1 / sqrt(3 D)`` (≈ 0.0128 for D = 2048).

    Returns:
        ``(K, D)`` float tensor (wrap it in a Parameter, or a buffer for memory_bank).
    """
    weight = torch.empty(num_words, dim, 1, 1)
    torch.nn.init.kaiming_normal_(weight, a=CODEBOOK_INIT_A, generator=generator)
    return weight[:, :, 0, 0].contiguous()


def word_assignment(features: Tensor, codebook: Tensor, temperature: float = WORD_TEMPERATURE) -> Tensor:
    """Soft word assignment ``S = softmax_K(cos(codebook_k, F_ij) / T)`` (vwe.md §2, ``_cosine``).

    The features are DETACHED here (P3: the codebook learns only from L2); both sides are L2-normalised
    with :func:`torch.nn.functional.normalize` (``v / max(||v||, 1e-12)``). Temperature 1 by default (P5).

    Args:
        features: ``(B, D, h, w)`` last-stage features ``F`` (NOT pre-detached by the caller).
        codebook: ``(K, D)`` or ``(K, D, 1, 1)``.
        temperature: softmax temperature ``T > 0``.

    Returns:
        ``(B, K, h, w)``; sums to 1 over ``K`` at every pixel; gradient reaches only ``codebook``.
    """
    _check_features(features)
    words = as_matrix(codebook, "codebook")
    if words.shape[1] != features.shape[1]:
        raise ValueError(f"codebook has dim {words.shape[1]}, features have {features.shape[1]} channels")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    fn = F.normalize(features.detach(), dim=1)
    cn = F.normalize(words.to(fn.dtype), dim=1)
    cos = torch.einsum("kd,bdhw->bkhw", cn, fn)
    return torch.softmax(cos / temperature, dim=1)


def word_histogram(assignment: Tensor, normalise: bool = False) -> Tensor:
    """Soft word histogram ``hist[b, k] = sum_{i,j} S[b, k, i, j]`` (vwe.md §2).

    A SUM over the ``h w`` locations (P4; sums to ``h w`` per image). ``normalise=True`` divides by
    ``h w`` (a frequency; changes the effective LR of W_a and the codebook, not the official behaviour).

    Args:
        assignment: ``(B, K, h, w)`` from :func:`word_assignment`.
        normalise: see above.

    Returns:
        ``(B, K)``.
    """
    if assignment.dim() != 4:
        raise ValueError(f"assignment must be (B, K, h, w), got {tuple(assignment.shape)}")
    hist = assignment.sum(dim=(-2, -1))
    if normalise:
        hist = hist / (assignment.shape[-2] * assignment.shape[-1])
    return hist


def word_labels(assignment: Tensor, valid: Tensor | None = None) -> Tensor:
    """Hard visual-word labels ``y_word`` (vwe.md §2), computed without gradient.

    ``y_word[b, k] = 1`` iff ``k = argmax_k' S[b, k', i, j]`` at one pixel at least (ties -> lowest index).
    By default every pixel of the crop votes, zero padding included (P10, kept for parity); ``valid``
    (the corrected behaviour) restricts the vote to pixels marked True (an image with no valid pixel
    then has no word).

    Args:
        assignment: ``(B, K, h, w)``.
        valid: optional ``(B, h, w)`` bool mask at the feature resolution.

    Returns:
        ``(B, K)`` float in {0, 1}, detached.
    """
    if assignment.dim() != 4:
        raise ValueError(f"assignment must be (B, K, h, w), got {tuple(assignment.shape)}")
    b, k, h, w = assignment.shape
    with torch.no_grad():
        hard = F.one_hot(assignment.detach().argmax(dim=1), num_classes=k)  # (B, h, w, K)
        if valid is not None:
            if tuple(valid.shape) != (b, h, w):
                raise ValueError(f"valid must be (B, h, w) = ({b}, {h}, {w}), got {tuple(valid.shape)}")
            hard = hard * valid.to(hard.dtype)[..., None]
        return (hard.amax(dim=(1, 2)) > 0).to(assignment.dtype)


def word_entropy(word_logits: Tensor) -> Tensor:
    """``L_ent = mean_b H(softmax(p_word[b]))`` (vwe.md §7a; weight 0 in the released code).

    Args:
        word_logits: ``(B, K)``.

    Returns:
        Scalar tensor (natural log).
    """
    if word_logits.dim() != 2:
        raise ValueError(f"word_logits must be (B, K), got {tuple(word_logits.shape)}")
    logp = torch.log_softmax(word_logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def decov_loss(codebook: Tensor, squared: bool = False) -> Tensor:
    """Codebook decorrelation loss of VWL's learned strategy (vwe.md §7a).

    ``Dc`` = codebook rows centred by their own mean over ``D``; ``Cov = Dc Dc^T`` (no normalisation);
    official: ``0.5 (||Cov||_F - sqrt(sum_k Cov_kk^2))`` (norms, not squared norms). ``squared=True``
    gives the DeCov form of Cogswell et al., ``0.5 (||Cov||_F^2 - sum_k Cov_kk^2)`` (half the sum of
    the squared off-diagonal entries).

    Args:
        codebook: ``(K, D)`` or ``(K, D, 1, 1)``.
        squared: see above.

    Returns:
        Scalar tensor, >= 0, zero iff the centred rows are pairwise orthogonal.
    """
    words = as_matrix(codebook, "codebook")
    dc = words - words.mean(dim=1, keepdim=True)
    cov = dc @ dc.t()
    diag = torch.diagonal(cov)
    if squared:
        return 0.5 * (cov.pow(2).sum() - diag.pow(2).sum())
    return 0.5 * (torch.linalg.matrix_norm(cov, ord="fro") - torch.linalg.vector_norm(diag))


# ----------------------------------------------------------------------------------------------------
# Memory-bank codebook (§7b, P12)
# ----------------------------------------------------------------------------------------------------


def _pixels(features: Tensor) -> Tensor:
    """``(B, D, h, w)`` -> ``(B h w, D)`` raw pixel features, detached."""
    _check_features(features)
    return features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def hard_word_assignment(features: Tensor, codebook: Tensor) -> Tensor:
    """``a[p] = argmax_k cos(F_p, codebook_k)`` for every pixel of the batch (vwe.md §7b, P12 intended).

    Args:
        features: ``(B, D, h, w)``.
        codebook: ``(K, D)`` or ``(K, D, 1, 1)``.

    Returns:
        ``(B h w,)`` int64 word indices, pixels in ``(b, i, j)`` row-major order.
    """
    words = as_matrix(codebook, "codebook").detach()
    pixels = _pixels(features)
    if words.shape[1] != pixels.shape[1]:
        raise ValueError(f"codebook has dim {words.shape[1]}, features have {pixels.shape[1]} channels")
    cos = F.normalize(pixels, dim=1) @ F.normalize(words.to(pixels.dtype), dim=1).t()
    return cos.argmax(dim=1)


def memory_bank_init(
    features: Tensor, num_words: int = NUM_WORDS, generator: torch.Generator | None = None
) -> Tensor:
    """Codebook after the FIRST iteration: ``K`` raw pixel features of the first batch (vwe.md §7b).

    Sampled uniformly at random with replacement among the ``B h w`` pixels, detached.

    Returns:
        ``(K, D)``.
    """
    pixels = _pixels(features)
    index = torch.randint(pixels.shape[0], (num_words,), generator=generator)
    return pixels[index.to(pixels.device)].clone()


def memory_bank_update(
    codebook: Tensor, features: Tensor, rho: float = MEMORY_BANK_RHO, eps: float = MEMORY_BANK_EPS
) -> Tensor:
    """One EMA step of the memory-bank codebook (vwe.md §7b), without gradient.

    ``M_k = sum_{p: a[p] = k} F_p / (count_k + eps)`` over the raw (un-normalised) features of the whole
    batch, ``M_k = 0`` for an unused word; ``codebook <- rho M + (1 - rho) codebook`` (unused words decay by
    ``1 - rho``). ``eps=0`` gives exact means. Call it after the forward pass that used the old codebook.

    Args:
        codebook: ``(K, D)`` or ``(K, D, 1, 1)`` current codebook (used for the assignment).
        features: ``(B, D, h, w)`` last-stage features of this batch.
        rho: EMA rate.
        eps: added to the per-word count.

    Returns:
        New ``(K, D)`` codebook (the input is not modified).
    """
    words = as_matrix(codebook, "codebook").detach()
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    pixels = _pixels(features).to(words.dtype)
    assign = hard_word_assignment(features, words)
    k = words.shape[0]
    sums = torch.zeros_like(words).index_add_(0, assign, pixels)
    counts = torch.bincount(assign, minlength=k).to(words.dtype)[:, None]
    used = counts > 0
    means = torch.where(used, sums / torch.where(used, counts + eps, torch.ones_like(counts)), 0.0)
    return rho * means + (1.0 - rho) * words


def memory_bank_step(
    codebook: Tensor,
    features: Tensor,
    step: int,
    rho: float = MEMORY_BANK_RHO,
    eps: float = MEMORY_BANK_EPS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The codebook after training step ``step`` (0-based) of the memory-bank strategy (vwe.md §7b).

    Step 0: :func:`memory_bank_init` on this batch (replaces the kaiming init; no EMA that step);
    later steps: :func:`memory_bank_update`.

    Returns:
        New ``(K, D)`` codebook.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step == 0:
        return memory_bank_init(features, as_matrix(codebook, "codebook").shape[0], generator).to(
            codebook.dtype
        )
    return memory_bank_update(codebook, features, rho, eps)


# ----------------------------------------------------------------------------------------------------
# Losses (§2, §7)
# ----------------------------------------------------------------------------------------------------


@float32
def vwe_losses(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    strategy: str = "ijcai",
    codebook: Tensor | None = None,
    weights: Mapping[str, float] | None = None,
    decov_squared: bool = False,
) -> dict[str, Tensor]:
    """All VWE loss terms, already weighted (vwe.md §2, §5, §7); ``L = sum(dict.values())``.

    Every term is :func:`torch.nn.functional.multilabel_soft_margin_loss` (mean over classes, then batch;
    for L3 a mean over the ``K`` words, P14)::

        img   = w_img  MLSM(p_img, y)             # L1, p_img = W_cls HSPP(F)
        w2i   = w_w2i  MLSM(p_w2i, y)             # L2, p_w2i = W_a hist(S(sg(F), codebook))  (ijcai, learned_v2)
        word  = w_word MLSM(p_word, sg(y_word))   # L3, p_word = W_b GAP(F)
        decov = w_decov decov_loss(codebook)      # learned_v2 only
        ent   = w_ent word_entropy(p_word)        # only when w_ent != 0 (0 in the code)

    Args:
        outputs: the network's heads (:meth:`lit_wsss.modules.VWE.head_outputs`): ``p_img`` (B, C), ``p_word``
            (B, K), ``y_word`` (B, K) from :func:`word_labels`, and ``p_w2i`` (B, C) for ijcai / learned_v2.
            The routing of vwe.md §2 (P3) is in them: ``p_w2i`` sees the features only through
            :func:`word_assignment`'s detach, ``y_word`` carries no gradient.
        labels: ``(B, C)`` foreground multi-hot image labels.
        strategy: one of :data:`STRATEGIES`.
        codebook: ``(K, D)`` the codebook; needed by learned_v2's decorrelation term.
        weights: overrides of :data:`LOSS_WEIGHTS` (keys ``img``, ``w2i``, ``word``, ``decov``, ``ent``).
        decov_squared: see :func:`decov_loss` (False = official).

    Returns:
        ``{"img", "word"}`` plus ``"w2i"`` (ijcai, learned_v2), ``"decov"`` (learned_v2) and ``"ent"``
        (only when its weight is non-zero); scalar tensors.
    """
    _check_strategy(strategy)
    w = dict(LOSS_WEIGHTS)
    if weights is not None:
        unknown = set(weights) - set(LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; expected keys of {sorted(LOSS_WEIGHTS)}")
        w.update(weights)
    use_w2i = strategy != "memory_bank"
    if use_w2i and "p_w2i" not in outputs:
        raise ValueError(f"strategy {strategy!r} needs p_w2i (the word-to-image head W_a)")
    if strategy == "learned_v2" and codebook is None:
        raise ValueError("strategy 'learned_v2' needs the codebook (decorrelation loss)")
    p_img, p_word, y_word = outputs["p_img"], outputs["p_word"], outputs["y_word"]
    b, c = p_img.shape
    if labels.dim() != 2 or tuple(labels.shape) != (b, c):
        raise ValueError(f"labels must be (B, C) = ({b}, {c}) foreground multi-hot, got {tuple(labels.shape)}")
    if p_word.shape != y_word.shape:
        raise ValueError(f"p_word {tuple(p_word.shape)} and y_word {tuple(y_word.shape)} differ")
    y = labels.to(p_img.dtype)
    losses = {
        "img": w["img"] * F.multilabel_soft_margin_loss(p_img, y),
        "word": w["word"] * F.multilabel_soft_margin_loss(p_word, y_word.to(y.dtype)),
    }
    if use_w2i:
        losses["w2i"] = w["w2i"] * F.multilabel_soft_margin_loss(outputs["p_w2i"], y)
    if strategy == "learned_v2":
        losses["decov"] = w["decov"] * decov_loss(codebook, squared=decov_squared)
    if w["ent"] != 0.0:
        losses["ent"] = w["ent"] * word_entropy(p_word)
    return losses
