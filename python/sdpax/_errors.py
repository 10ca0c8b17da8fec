"""The exception sdpax raises for an invalid call."""


class AttentionError(RuntimeError, ValueError):
    """An invalid argument to scaled_dot_product_attention (or a CausalBias that does not fit the call).

    Both a RuntimeError, which is what torch raises for the same mistakes (code written against torch catches
    that), and a ValueError, since the problem is an argument's value.
    """
