"""SLAMs-R core: semantic encoder (stage A), activation-map losses with a frozen encoder (stage B), inference.

Pure functions of tensors (batch-first, no module state: learnable weights are passed in as tensors, the
frozen semantic encoder as a callable), reimplemented from ../shared/methods/slams.md §2 (stage A), §3
(stage B), §4 (inference), §6 (hyperparameters) and §8 (pitfalls); tests follow §10 items 1-7.

Provenance tags (slams.md legend): [S] = ``JLChen-C/SemFormer`` code (the sibling method; the SLAMs code
is not public), [A] = SLAMs abstract, [R] = reconstruction/assumption. Nothing tagged [R] is "the paper's".
Shapes: ``C`` foreground classes, ``K = C + 1`` categories with background at index 0 (always present,
§8 P2), ``E`` embedding size (256), ``S`` the SE input size (224), ``N = sum_b (1 + |labels_b|)`` pairs::

    Stage A (§2)                                                                  semantic_embeddings, ...
    e      = sum_{h,w} relu(W_proj G)  reshaped (B, K, E)       [S sum pooling; CNN 1x1 conv R]
    s      = relu(W_sem)                                         (K, E)  [S]     category_semantics
    s'     = s for categories present in image b, s.detach() otherwise   [S, §8 P4]
    sim    = clamp(cos(e, s'), -1 + 1e-4, 1 - 1e-4)              (B, K)  [S]     encoder_similarity
    L_SE   = w_se BCE(sim, y+)  (+ w_rec MSE(recon, x_s), only when a reconstruction is given [R: off])

    Stage B (§3)                                                                  activation_map_losses
    valid  = crop-box valid mask downscaled to S x S with floor  [S grad_masks; box convention R] downscale_valid
    M      = sigmoid(bilinear_ac(Z -> S)) * valid                (B, K, S, S)    activation_masks
    x_s    = bilinear_ac(x -> S)                                 (B, 3, S, S)    se_image
    pairs  (b, k) with y+_{b,k} = 1;  O(b, k) = present(b) \\ {k}                category_pairs
    x_fg   = x_s[b] M[b,k],  x_bg = x_s[b] (1 - M[b,k])          (N, 3, S, S)    pair_images
    c_fg[n, j] = cos(SE(x_fg)[n, j], sg(s_j)),  c_bg likewise    (N, K)  frozen but differentiable SE (P3)
    L_cf   = 1/2 [(1 - mean_n c_fg[n, k_n]) + (1 + mean_{n, j in O} c_fg[n, j])]   [S cls_fg_loss]
    L_cb   = 1/2 [(1 - mean_{n, j in O} c_bg[n, j]) + (1 + mean_n c_bg[n, k_n])]   [S cls_bg_loss]
    L_ar   = mean_{b, k>=1, p} M + (1 - mean_{b, p} M[:, 0])                        [S act_supp_loss]
    L_con  = "complementation" (default) [S act_cplt_loss; reading of "consistency" R]:
             sum_{n: |O|>=1} sum_{p valid} (M[b,k,p] + max_{j in O} M[b,j,p] - 1)^2 / sum_n #valid
           | "view" [R]: mean_{valid p, k} |M(x) - flip(M(flip x))|  (SEAM-style)
    L      = 1.0 L_cf + 1.0 L_cb + 0.075 L_ar + 1.0 L_con   [S weights; S's fifth term L_cls (seg_sim_loss)
             needs class tokens a CNN lacks: left out, R]

    Inference (§4)                                                           SLAMs.infer_cams
    A_s    = relu(Z(image_s))[:, 1:]  (logits, NOT sigmoid; background dropped, §8 P6)  cam_from_logits
    CAM    = sum over scales (0.5, 1, 1.5, 2) x {id, h-flip}; keep label channels; / (max + 1e-5)

Labels are the batch convention of the datamodules: ``(B, C)`` multi-hot over the FOREGROUND classes;
``y+ = cat[1, labels]`` (background always on) is built here. Averages over an empty set of pairs are 0,
not NaN (§8 P9). Cosines are computed in float32 (or float64) even when the inputs are half precision
(§8 P11).

What a module must do (written elsewhere): run the SE backbone and pass its features to
:func:`semantic_embeddings` (stage A); in stage B put the SE in eval mode with ``requires_grad=False`` but
NOT under ``no_grad`` (§8 P3; :func:`activation_map_losses` raises otherwise when the encoder is an
``nn.Module``), and pass the segnet logits at the crop's feature resolution, the normalised crop, its
``valid`` mask, the labels, the SE as ``encoder(x) -> (n, K, E)`` and the SE's raw semantic weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


#: Embedding size ``E`` (slams.md §2, §6: ``--class_dim 256``).
EMBED_DIM = 256
#: Input size of the semantic encoder (slams.md §2, §6: ``--ae_image_size 224``).
SE_SIZE = 224
#: The SE similarity is clamped to ``[-1 + 1e-4, 1 - 1e-4]`` before the BCE (slams.md §2).
SIM_CLAMP_EPS = 1e-4
#: Norm clamp of :func:`torch.nn.functional.cosine_similarity` (its default).
COSINE_EPS = 1e-8
#: Added to the per-channel max in the CAM normalisation (slams.md §4).
CAM_NORM_EPS = 1e-5
#: Inference scales of SemFormer's ``inference_semformer.py`` (slams.md §4, §6), each with its h-flip.
SLAMS_CAM_SCALES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
#: Stage A weights (slams.md §2): BCE on the similarity; reconstruction MSE when a decoder is used.
W_SE = 1.0
W_REC = 1.0
#: Stage B weights (slams.md §3, §6, SLAMs-R column).
W_CF = 1.0
W_CB = 1.0
W_AR = 0.075
W_CON = 1.0
#: Names of the stage-B terms.
STAGE_B_KEYS = ("cf", "cb", "ar", "con")

Reduction = Literal["sum", "mean"]
Consistency = Literal["complementation", "view"]


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def labels_with_background(labels: Tensor) -> Tensor:
    """``y+ = cat[1, labels]`` as a bool ``(B, K)`` tensor (slams.md §2, §8 P2).

    Args:
        labels: ``(B, C)`` foreground multi-hot labels (bool, int or float with values in {0, 1}).

    Returns:
        ``(B, C + 1)`` bool, column 0 all True.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, C) foreground multi-hot, got {tuple(labels.shape)}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be multi-hot (values in {0, 1})")
    y = labels.bool()
    return torch.cat([torch.ones_like(y[:, :1]), y], dim=1)


def _check_labels(labels: Tensor, batch: int, categories: int) -> Tensor:
    y = labels_with_background(labels)
    if tuple(y.shape) != (batch, categories):
        raise ValueError(
            f"labels must be (B, C) = ({batch}, {categories - 1}) foreground multi-hot (background is added"
            f" here), got {tuple(labels.shape)}"
        )
    return y


def _fp32(x: Tensor) -> Tensor:
    """Half-precision tensors as float32 (cosines in fp32, §8 P11); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _safe_mean(x: Tensor) -> Tensor:
    """``nanmean`` of ``x`` with 0 (not NaN) for an empty or all-NaN input (§8 P9), keeping the graph."""
    if x.numel() == 0:
        return x.sum()
    m = torch.nanmean(x)
    return torch.where(torch.isnan(m), torch.zeros_like(m), m)


def _check_weight_2d(weight: Tensor, name: str) -> Tensor:
    """A 1x1-conv/linear weight ``(O, I)`` or ``(O, I, 1, 1)`` as ``(O, I)``."""
    if weight.dim() == 4 and tuple(weight.shape[-2:]) == (1, 1):
        return weight[:, :, 0, 0]
    if weight.dim() != 2:
        raise ValueError(f"{name} must be (O, I) or (O, I, 1, 1), got {tuple(weight.shape)}")
    return weight


def _check_frozen(encoder: Callable[[Tensor], Tensor]) -> None:
    """Stage B needs a frozen SE (§8 P3): an ``nn.Module`` must be in eval mode without trainable parameters."""
    if isinstance(encoder, nn.Module):
        if encoder.training:
            raise ValueError("the semantic encoder must be in eval mode in stage B (slams.md §3, §8 P3)")
        trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"the semantic encoder must be frozen in stage B (requires_grad=False), trainable: {trainable[:5]}"
            )


# ----------------------------------------------------------------------------------------------------
# Stage A: semantic encoder (§2)
# ----------------------------------------------------------------------------------------------------


def semantic_embeddings(
    features: Tensor, projection_weight: Tensor, num_categories: int, reduction: Reduction = "sum"
) -> Tensor:
    """Category-specific embeddings ``e`` of the semantic encoder (slams.md §2).

    ``U = relu(conv1x1_{D -> K*E, no bias}(G))`` [R: 1x1 conv on CNN features, the CNN transplant of
    SemFormer's Linear + ReLU on tokens, S], then ``e = sum_{h,w} U`` [S: ``reduction='sum'``] reshaped
    category-major, i.e. channel ``k * E + i`` is entry ``i`` of category ``k`` [R: layout]. ``reduction``
    ``"mean"`` divides by ``h*w`` (SemFormer's other ``--reduction``); every cosine of §2/§3 is scale-invariant,
    so the choice only changes the embedding's magnitude.

    Args:
        features: ``(B, D, h, w)`` SE backbone features ``G`` (SLAMs-R: ResNet-50, stride 16 [R]).
        projection_weight: ``(K*E, D)`` or ``(K*E, D, 1, 1)`` weight of the bias-free projection.
        num_categories: ``K = C + 1``.
        reduction: ``"sum"`` (default, [S]) or ``"mean"`` over positions.

    Returns:
        ``(B, K, E)`` non-negative embeddings.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, h, w), got {tuple(features.shape)}")
    w = _check_weight_2d(projection_weight, "projection_weight")
    if w.shape[1] != features.shape[1]:
        raise ValueError(f"projection_weight {tuple(w.shape)} does not take {features.shape[1]} channels")
    if num_categories < 2 or w.shape[0] % num_categories:
        raise ValueError(f"{w.shape[0]} output channels are not K * E for K = {num_categories}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    u = F.relu(torch.einsum("od,bdhw->bohw", w, features))
    e = u.sum(dim=(-2, -1)) if reduction == "sum" else u.mean(dim=(-2, -1))
    return e.reshape(features.shape[0], num_categories, -1)


def category_semantics(semantic_weight: Tensor) -> Tensor:
    """Learnable category semantics ``s = relu(Embedding(K, E).weight)`` (slams.md §2, [S]).

    Args:
        semantic_weight: ``(K, E)`` raw embedding weight.

    Returns:
        ``(K, E)``.
    """
    if semantic_weight.dim() != 2:
        raise ValueError(f"semantic_weight must be (K, E), got {tuple(semantic_weight.shape)}")
    return F.relu(semantic_weight)


def clamped_cosine(a: Tensor, b: Tensor) -> Tensor:
    """``clamp(cos(a, b), -1 + 1e-4, 1 - 1e-4)`` over the last dim, in float32 or wider (slams.md §2, [S])."""
    c = F.cosine_similarity(_fp32(a), _fp32(b), dim=-1, eps=COSINE_EPS)
    return c.clamp(-1.0 + SIM_CLAMP_EPS, 1.0 - SIM_CLAMP_EPS)


def encoder_similarity(embeddings: Tensor, semantic_weight: Tensor, labels: Tensor) -> Tensor:
    """SE similarity ``sim[b, k] = clamp(cos(e[b, k], s'[b, k]))`` with the per-image detach (§2, §8 P4).

    ``s'[b, k] = s_k`` when category ``k`` is present in image ``b`` (background always) and
    ``s_k.detach()`` otherwise [S: ``core/models/caae.py`` forward], so an absent category's semantics get
    no gradient from that image (the embedding ``e[b, k]`` still does). The values equal the plain
    clamped cosine; use them for SemFormer's label-only checkpoint criterion (mAP of ``sim`` against ``y+``).

    Args:
        embeddings: ``(B, K, E)`` from :func:`semantic_embeddings`.
        semantic_weight: ``(K, E)`` raw semantic weight (ReLU applied here, :func:`category_semantics`).
        labels: ``(B, C)`` foreground multi-hot labels.

    Returns:
        ``(B, K)`` similarities in ``[-1 + 1e-4, 1 - 1e-4]`` (non-negative in practice: both sides ReLU'd).
    """
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be (B, K, E), got {tuple(embeddings.shape)}")
    s = category_semantics(semantic_weight)
    if tuple(s.shape) != tuple(embeddings.shape[1:]):
        raise ValueError(
            f"semantic_weight {tuple(s.shape)} does not match embeddings {tuple(embeddings.shape)}"
        )
    y = _check_labels(labels, embeddings.shape[0], embeddings.shape[1])
    s_prime = torch.where(y[:, :, None], s[None], s.detach()[None])
    return clamped_cosine(embeddings, s_prime)


def _bce(prob: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy outside autocast (float32 or wider)."""
    with torch.autocast(device_type=prob.device.type, enabled=False):
        return F.binary_cross_entropy(_fp32(prob), target.to(_fp32(prob).dtype))


def encoder_losses(
    embeddings: Tensor,
    semantic_weight: Tensor,
    labels: Tensor,
    *,
    w_se: float = W_SE,
    reconstruction: Tensor | None = None,
    image: Tensor | None = None,
    w_rec: float = W_REC,
) -> dict[str, Tensor]:
    """Stage-A losses of the semantic encoder (slams.md §2); the caller sums the returned terms.

    ``"se"``: ``w_se * BCE(sim, y+)`` with ``sim`` = :func:`encoder_similarity` and the mean over the
    ``B * K`` entries [S; ``mean`` reduction = the BCE default, R]. ``"rec"``: ``w_rec * MSE(reconstruction,
    image)``, only when a ``reconstruction`` is passed: SemFormer's auto-encoder decoder term [S]; SLAMs
    speaks of an "encoder", so SLAMs-R has no decoder and the default is OFF [R].

    Args:
        embeddings: ``(B, K, E)`` from :func:`semantic_embeddings`.
        semantic_weight: ``(K, E)`` raw ``Embedding(K, E)`` weight.
        labels: ``(B, C)`` foreground multi-hot labels.
        w_se: weight of the similarity BCE (1.0 [S]).
        reconstruction: optional ``(B, 3, S, S)`` decoder output (SemFormer parity only).
        image: ``(B, 3, S, S)`` SE input, required with ``reconstruction``.
        w_rec: weight of the reconstruction MSE (1.0 [S]).

    Returns:
        ``{"se"}`` or ``{"se", "rec"}`` scalar tensors.
    """
    sim = encoder_similarity(embeddings, semantic_weight, labels)
    out = {"se": w_se * _bce(sim, labels_with_background(labels))}
    if reconstruction is not None:
        if image is None or reconstruction.shape != image.shape:
            raise ValueError(
                f"reconstruction needs the SE input image of the same shape, got "
                f"{tuple(reconstruction.shape)} and {None if image is None else tuple(image.shape)}"
            )
        out["rec"] = w_rec * F.mse_loss(reconstruction, image)
    return out


# ----------------------------------------------------------------------------------------------------
# Stage B: inputs of the frozen SE (§3)
# ----------------------------------------------------------------------------------------------------


def downscale_valid(valid: Tensor, size: tuple[int, int]) -> Tensor:
    """The crop's valid region (1 inside the un-padded image, 0 on padding) at the SE size (§3, §8 P7, P10).

    SemFormer builds its ``grad_masks`` from the crop box and downscales it "with floor" [S]; here the box
    is read back from the (rectangular) ``valid`` mask of the datamodule and each box edge is scaled as
    ``floor(edge * size / crop)`` with exclusive end edges, i.e. rows ``[floor(y0 s), floor(y1 s))`` [R: the
    exact box convention]. A valid mask that is not a rectangle raises; an all-False one stays all 0.

    Args:
        valid: ``(B, H, W)`` bool (or 0/1) mask at the crop resolution.
        size: ``(S_h, S_w)`` target size.

    Returns:
        ``(B, S_h, S_w)`` float mask (default dtype).
    """
    if valid.dim() != 3:
        raise ValueError(f"valid must be (B, H, W), got {tuple(valid.shape)}")
    v = valid.bool()
    b, h, w = v.shape
    rows, cols = v.any(dim=2), v.any(dim=1)  # (B, H), (B, W)

    def edges(line: Tensor, n: int) -> tuple[Tensor, Tensor]:
        has = line.any(dim=1)
        start = line.int().argmax(dim=1)
        end = n - line.flip(1).int().argmax(dim=1)
        return torch.where(has, start, 0), torch.where(has, end, 0)

    y0, y1 = edges(rows, h)
    x0, x1 = edges(cols, w)

    def box(a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor, hh: int, ww: int) -> Tensor:
        r = torch.arange(hh, device=v.device)[None, :, None]
        c = torch.arange(ww, device=v.device)[None, None, :]
        return (
            (r >= a0[:, None, None])
            & (r < a1[:, None, None])
            & (c >= b0[:, None, None])
            & (c < b1[:, None, None])
        )

    if not torch.equal(box(y0, y1, x0, x1, h, w), v):
        raise ValueError("valid must be one axis-aligned rectangle per image (the un-padded crop region)")
    sh, sw = int(size[0]), int(size[1])
    out = box(
        torch.div(y0 * sh, h, rounding_mode="floor"),
        torch.div(y1 * sh, h, rounding_mode="floor"),
        torch.div(x0 * sw, w, rounding_mode="floor"),
        torch.div(x1 * sw, w, rounding_mode="floor"),
        sh,
        sw,
    )
    return out.to(torch.get_default_dtype())


def activation_masks(
    logits: Tensor, size: tuple[int, int] = (SE_SIZE, SE_SIZE), valid: Tensor | None = None
) -> Tensor:
    """Training masks ``M = sigmoid(bilinear_ac(Z -> S)) * valid`` (slams.md §3, §8 P6/P7/P10, [S]).

    The bilinear resize (``align_corners=True``) comes BEFORE the sigmoid.

    Args:
        logits: ``(B, K, h', w')`` segnet logits ``Z``.
        size: SE input size ``(S, S)``.
        valid: ``(B, S_h, S_w)`` valid mask at the SE size (:func:`downscale_valid`), or ``None`` (no padding).

    Returns:
        ``(B, K, S_h, S_w)`` in [0, 1], 0 on padding.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, K, h, w), got {tuple(logits.shape)}")
    m = torch.sigmoid(F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True))
    if valid is not None:
        if tuple(valid.shape) != (m.shape[0], *m.shape[-2:]):
            raise ValueError(f"valid {tuple(valid.shape)} does not match masks {tuple(m.shape)}")
        m = m * valid.to(m.dtype)[:, None]
    return m


def se_image(image: Tensor, size: tuple[int, int] = (SE_SIZE, SE_SIZE)) -> Tensor:
    """SE input ``x_s = bilinear_ac(x -> S)`` of the normalised crop (slams.md §3, §8 P10, [S])."""
    if image.dim() != 4:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    return F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=True)


def category_pairs(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ``N`` (image, present category) pairs of stage B and their "other present" sets (§3, §8 P2).

    Pairs are all ``(b, k)`` with ``y+_{b,k} = 1`` (background included), ordered by image then category;
    ``O(b, k) = present(b) \\ {k}`` (empty only for the background pair of an image without labels).

    Args:
        labels: ``(B, C)`` foreground multi-hot labels.

    Returns:
        ``(batch_index (N,), category_index (N,), others (N, K) bool)``.
    """
    y = labels_with_background(labels)
    b_idx, k_idx = y.nonzero(as_tuple=True)
    own = F.one_hot(k_idx, num_classes=y.shape[1]).bool()
    return b_idx, k_idx, y[b_idx] & ~own


def pair_images(
    image_se: Tensor, masks: Tensor, batch_index: Tensor, category_index: Tensor
) -> tuple[Tensor, Tensor]:
    """Category-foreground and category-background images ``x_s[b] M[b,k]`` and ``x_s[b] (1 - M[b,k])`` (§3).

    Masking multiplies the NORMALISED image [R: §3 masks ``x_s`` without saying which normalisation; we
    take the datamodule's ImageNet-normalised crop], so masked-out pixels read as the ImageNet mean colour.

    Args:
        image_se: ``(B, 3, S, S)`` from :func:`se_image`.
        masks: ``(B, K, S, S)`` from :func:`activation_masks`.
        batch_index, category_index: ``(N,)`` from :func:`category_pairs`.

    Returns:
        ``(x_fg, x_bg)``, each ``(N, 3, S, S)``; ``x_fg + x_bg == x_s[b]`` up to rounding.
    """
    if image_se.dim() != 4 or masks.dim() != 4 or image_se.shape[0] != masks.shape[0]:
        raise ValueError(f"image {tuple(image_se.shape)} and masks {tuple(masks.shape)} do not match")
    if tuple(image_se.shape[-2:]) != tuple(masks.shape[-2:]):
        raise ValueError(f"image {tuple(image_se.shape)} and masks {tuple(masks.shape)} differ in size")
    m = masks[batch_index, category_index][:, None]
    x = image_se[batch_index]
    return x * m, x * (1.0 - m)


def pair_similarity(embeddings: Tensor, semantic_weight: Tensor) -> Tensor:
    """``c[n, j] = cos(e[n, j], sg(s_j))`` for the SE embeddings of the masked images (slams.md §3, [S]).

    The semantics are detached (the SE is frozen in stage B). Unlike stage A the cosine is NOT clamped: §3
    states no clamp and §10 item 3 needs ``1 - c = 0`` exactly for a perfect match [R: no clamp].

    Args:
        embeddings: ``(N, K, E)`` SE embeddings of ``x_fg`` or ``x_bg``.
        semantic_weight: ``(K, E)`` raw SE semantic weight.

    Returns:
        ``(N, K)`` in float32 or wider.
    """
    s = category_semantics(semantic_weight).detach()
    if embeddings.dim() != 3 or tuple(embeddings.shape[1:]) != tuple(s.shape):
        raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match semantics {tuple(s.shape)}")
    return F.cosine_similarity(_fp32(embeddings), _fp32(s)[None], dim=-1, eps=COSINE_EPS)


def _own_and_others(sim: Tensor, category_index: Tensor, others: Tensor) -> tuple[Tensor, Tensor]:
    if sim.dim() != 2 or tuple(others.shape) != tuple(sim.shape) or category_index.shape != sim.shape[:1]:
        raise ValueError(
            f"sim (N, K), category_index (N,) and others (N, K) expected, got {tuple(sim.shape)},"
            f" {tuple(category_index.shape)}, {tuple(others.shape)}"
        )
    own = sim.gather(1, category_index[:, None].long())[:, 0]
    return _safe_mean(own), _safe_mean(sim[others.bool()])


def category_foreground_loss(sim_fg: Tensor, category_index: Tensor, others: Tensor) -> Tensor:
    """``L_cf = 1/2 [(1 - mean_n c_fg[n, k_n]) + (1 + mean_{n, j in O} c_fg[n, j])]`` (§3, [S] cls_fg_loss).

    The foreground image of category ``k`` must look like ``k`` (pull) and not like the image's other
    present categories (push). Each mean is a flat (nan)mean over its listed entries [R: "mean over the listed
    pairs" read as one flat mean over all ``(n, j)`` entries, not a mean of per-pair means], 0 when there are
    none [R: our reading of §8 P9, so the push/pull term of an empty set is exactly 1]. With ``c >= 0`` (ReLU'd embeddings) the push term is ``>= 1``, so ``L_cf >= 0.5`` (§8 P8).

    Args:
        sim_fg: ``(N, K)`` :func:`pair_similarity` of the foreground images.
        category_index: ``(N,)`` own category of each pair.
        others: ``(N, K)`` bool "other present categories" of each pair.

    Returns:
        Scalar tensor.
    """
    own, other = _own_and_others(sim_fg, category_index, others)
    return 0.5 * ((1.0 - own) + (1.0 + other))


def category_background_loss(sim_bg: Tensor, category_index: Tensor, others: Tensor) -> Tensor:
    """``L_cb = 1/2 [(1 - mean_{n, j in O} c_bg[n, j]) + (1 + mean_n c_bg[n, k_n])]`` (§3, [S] cls_bg_loss).

    The background image of category ``k`` must still show the other present categories (pull) and no
    trace of ``k`` (push). Means as in :func:`category_foreground_loss`.

    Args:
        sim_bg: ``(N, K)`` :func:`pair_similarity` of the background images.
        category_index: ``(N,)``.
        others: ``(N, K)`` bool.

    Returns:
        Scalar tensor.
    """
    own, other = _own_and_others(sim_bg, category_index, others)
    return 0.5 * ((1.0 - other) + (1.0 + own))


def activation_regularisation_loss(masks: Tensor) -> Tensor:
    """``L_ar = mean_{b, k>=1, p} M + (1 - mean_{b, p} M[:, 0])`` (slams.md §3, [S] act_supp_loss).

    Every object channel, present or not, is pushed down and the background channel up; the means run over
    ALL pixels, padding included, where ``M = 0`` (so padding adds ``1`` per padded pixel to the background
    part) [R: read from §10 item 4, which tests "without padding"; §8 P7 restricts only L_con to valid
    pixels].

    Args:
        masks: ``(B, K, S, S)`` from :func:`activation_masks`.

    Returns:
        Scalar tensor, 0 iff every object channel is 0 and the background channel is 1 everywhere.
    """
    if masks.dim() != 4 or masks.shape[1] < 2:
        raise ValueError(f"masks must be (B, K >= 2, S, S), got {tuple(masks.shape)}")
    return masks[:, 1:].mean() + (1.0 - masks[:, 0].mean())


def complementation_loss(masks: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """``L_con`` option A: activation complementation (slams.md §3, [S] act_cplt_loss; as "consistency" R).

    ``sum_{(b,k): |O|>=1} sum_{p valid} (M[b,k,p] + max_{j in O(b,k)} M[b,j,p] - 1)^2`` divided by the
    total number of valid pixels over those terms: each present category and the strongest other present
    category must add up to 1 on every valid pixel. Gradient flows into both maps. Padded pixels are
    ignored whatever ``M`` holds there (§8 P7); no term -> 0 (§8 P9).

    Args:
        masks: ``(B, K, S, S)``.
        labels: ``(B, C)`` foreground multi-hot labels.
        valid: ``(B, S, S)`` valid mask at the SE size, or ``None`` (all valid).

    Returns:
        Scalar tensor; 0 for a hard partition of the valid pixels among the present categories.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, K, S, S), got {tuple(masks.shape)}")
    _check_labels(labels, masks.shape[0], masks.shape[1])
    b_idx, k_idx, others = category_pairs(labels)
    keep = others.any(dim=1)
    own = masks[b_idx, k_idx]  # (N, S, S)
    neg_inf = torch.full((), float("-inf"), dtype=masks.dtype, device=masks.device)
    other_max = torch.where(others[:, :, None, None], masks[b_idx], neg_inf).amax(dim=1)
    other_max = torch.where(keep[:, None, None], other_max, torch.zeros_like(other_max))
    if valid is None:
        v = torch.ones_like(own, dtype=torch.bool)
    else:
        if tuple(valid.shape) != (masks.shape[0], *masks.shape[-2:]):
            raise ValueError(f"valid {tuple(valid.shape)} does not match masks {tuple(masks.shape)}")
        v = valid.bool()[b_idx]
    v = v & keep[:, None, None]
    err = torch.where(v, (own + other_max - 1.0) ** 2, torch.zeros_like(own))
    count = v.sum()
    return err.sum() / count.clamp_min(1).to(err.dtype)


def view_consistency_loss(masks: Tensor, masks_flipped_view: Tensor, valid: Tensor | None = None) -> Tensor:
    """``L_con`` option B [R]: cross-view consistency ``mean |M(x) - flip(M(flip x))|`` (SEAM-style, §3).

    A reconstruction for the case that SLAMs' "consistency" means view consistency; every choice here is
    ours [R]: L1 on the sigmoid masks at the SE size, all ``K`` channels, averaged over the valid pixels of
    the un-flipped view. :func:`activation_map_losses` masks the flipped view with
    ``downscale_valid(flip(valid))``, which can differ from ``flip(downscale_valid(valid))`` by one column.

    Args:
        masks: ``(B, K, S, S)`` masks of ``x``.
        masks_flipped_view: ``(B, K, S, S)`` masks of ``flip(x)`` (not yet flipped back).
        valid: ``(B, S, S)`` valid mask of ``x`` at the SE size, or ``None``.

    Returns:
        Scalar tensor.
    """
    if masks.dim() != 4 or masks.shape != masks_flipped_view.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and {tuple(masks_flipped_view.shape)} must match")
    diff = (masks - masks_flipped_view.flip(-1)).abs()
    if valid is None:
        return diff.mean()
    if tuple(valid.shape) != (masks.shape[0], *masks.shape[-2:]):
        raise ValueError(f"valid {tuple(valid.shape)} does not match masks {tuple(masks.shape)}")
    v = valid.bool()[:, None].expand_as(diff)
    return torch.where(v, diff, torch.zeros_like(diff)).sum() / v.sum().clamp_min(1).to(diff.dtype)


def activation_map_losses(
    logits: Tensor,
    image: Tensor,
    labels: Tensor,
    encoder: Callable[[Tensor], Tensor],
    semantic_weight: Tensor,
    valid: Tensor | None = None,
    *,
    se_size: tuple[int, int] = (SE_SIZE, SE_SIZE),
    w_cf: float = W_CF,
    w_cb: float = W_CB,
    w_ar: float = W_AR,
    w_con: float = W_CON,
    consistency: Consistency = "complementation",
    logits_flipped: Tensor | None = None,
) -> dict[str, Tensor]:
    """Stage-B losses of the activation-map network with the frozen SE (slams.md §3); the caller sums them.

    Steps: ``valid`` -> :func:`downscale_valid`; ``M`` = :func:`activation_masks`; ``x_s`` = :func:`se_image`;
    pairs = :func:`category_pairs`; ``(x_fg, x_bg)`` = :func:`pair_images`; ONE call
    ``encoder(cat[x_fg, x_bg])`` (``2N`` images); then :func:`category_foreground_loss`,
    :func:`category_background_loss`, :func:`activation_regularisation_loss` and ``L_con`` on ``M``.
    The encoder is NOT run under ``no_grad``, so ``dL/dZ`` flows through it (§8 P3); an
    ``nn.Module`` encoder in training mode or with trainable parameters raises. Semantics are detached.

    Options: ``consistency="complementation"`` (default, [S] act_cplt_loss) or ``"view"`` ([R], needs
    ``logits_flipped``, the logits of the horizontally flipped crop). SemFormer's fifth term ``L_cls`` needs
    class-token embeddings a CNN does not have: SLAMs lists four losses [A], and SLAMs-R leaves it out [R].

    Args:
        logits: ``(B, K, h', w')`` segnet logits ``Z`` of the crop (any resolution; resized to ``se_size``).
        image: ``(B, 3, H, W)`` normalised crop (448 x 448 in SLAMs-R).
        labels: ``(B, C)`` foreground multi-hot labels.
        encoder: frozen SE, ``(n, 3, S, S) -> (n, K, E)`` embeddings (backbone + :func:`semantic_embeddings`).
        semantic_weight: ``(K, E)`` the SE's raw ``Embedding`` weight.
        valid: ``(B, H, W)`` bool in-image mask of the crop (rectangle), or ``None`` (no padding).
        se_size: SE input size (224).
        w_cf, w_cb, w_ar, w_con: term weights (1, 1, 0.075, 1).
        consistency: ``"complementation"`` or ``"view"``.
        logits_flipped: ``(B, K, h', w')`` logits of ``flip(image)``; only for ``consistency="view"``.

    Returns:
        ``{"cf", "cb", "ar", "con"}`` weighted scalar tensors.
    """
    if logits.dim() != 4 or image.dim() != 4 or logits.shape[0] != image.shape[0]:
        raise ValueError(
            f"logits (B, K, h, w) and image (B, 3, H, W) expected, got {tuple(logits.shape)},"
            f" {tuple(image.shape)}"
        )
    if consistency not in ("complementation", "view"):
        raise ValueError(f"consistency must be 'complementation' or 'view', got {consistency!r}")
    if consistency == "view" and (logits_flipped is None or logits_flipped.shape != logits.shape):
        raise ValueError("consistency='view' needs logits_flipped of the same shape as logits")
    _check_frozen(encoder)
    b, k = logits.shape[:2]
    _check_labels(labels, b, k)
    labels = labels.to(logits.device)
    if valid is not None and tuple(valid.shape) != (b, *image.shape[-2:]):
        raise ValueError(
            f"valid must be (B, H, W) = ({b}, {image.shape[-2]}, {image.shape[-1]}), got {tuple(valid.shape)}"
        )

    valid_se = None if valid is None else downscale_valid(valid, se_size).to(logits.device)
    masks = activation_masks(logits, se_size, valid_se)
    x_s = se_image(image, se_size)
    b_idx, k_idx, others = category_pairs(labels)
    x_fg, x_bg = pair_images(x_s, masks, b_idx, k_idx)
    emb = encoder(torch.cat([x_fg, x_bg], dim=0))
    n = b_idx.shape[0]
    if emb.dim() != 3 or emb.shape[0] != 2 * n:
        raise ValueError(f"encoder must return (2N, K, E) = ({2 * n}, {k}, E), got {tuple(emb.shape)}")
    sim = pair_similarity(emb, semantic_weight)
    out = {
        "cf": w_cf * category_foreground_loss(sim[:n], k_idx, others),
        "cb": w_cb * category_background_loss(sim[n:], k_idx, others),
        "ar": w_ar * activation_regularisation_loss(masks),
    }
    if consistency == "complementation":
        out["con"] = w_con * complementation_loss(masks, labels, valid_se)
    else:
        assert logits_flipped is not None
        flipped_valid = None if valid is None else downscale_valid(valid.flip(-1), se_size).to(logits.device)
        masks_f = activation_masks(logits_flipped, se_size, flipped_valid)
        out["con"] = w_con * view_consistency_loss(masks, masks_f, valid_se)
    return out


# ----------------------------------------------------------------------------------------------------
# Inference (§4)
# ----------------------------------------------------------------------------------------------------


def cam_from_logits(logits: Tensor) -> Tensor:
    """``relu(Z)[:, 1:]``: raw logits of the object channels, NOT sigmoid (slams.md §4, §8 P6, [S]).

    Args:
        logits: ``(N, K, h, w)`` segnet logits.

    Returns:
        ``(N, C, h, w)`` non-negative maps (background channel dropped).
    """
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, K >= 2, h, w), got {tuple(logits.shape)}")
    return F.relu(logits[:, 1:])
