"""Methods as LightningModules: a shared base, the CAM-head mixin, one file per paper."""

from lit_wsss.modules.base import WSSSModule
from lit_wsss.modules.cam import CAM
from lit_wsss.modules.cam_head import CAMHeadMixin
from lit_wsss.modules.cpn import CPN
from lit_wsss.modules.gslm import GSLM
from lit_wsss.modules.irn import IRN
from lit_wsss.modules.segmentation import DeepLab
from lit_wsss.modules.sipe import SIPE
from lit_wsss.modules.slams import SLAMs, SemanticEncoder
from lit_wsss.modules.vwe import VWE

__all__ = ["CAM", "CAMHeadMixin", "CPN", "DeepLab", "GSLM", "IRN", "SIPE", "SLAMs", "SemanticEncoder", "VWE", "WSSSModule"]
