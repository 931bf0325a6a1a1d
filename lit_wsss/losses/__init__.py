"""Loss functions and method maths of the WSSS methods, as pure functions of tensors (one module per paper).

``irn`` (protocol.md §6.4), ``sipe`` (sipe.md), ``cpn`` (cpn.md), ``vwe`` (vwe.md), ``gslm`` (cls.md),
``slams`` (slams.md, a reconstruction), ``segmentation`` (the final stage, issue 14). The learnable layers
belong to the LightningModules.
"""
