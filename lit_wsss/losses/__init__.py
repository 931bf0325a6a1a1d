"""Loss functions of the WSSS methods, as pure functions of tensors.

``irn``: IRNet's inter-pixel affinity and displacement losses (protocol.md §6.4).
"""
