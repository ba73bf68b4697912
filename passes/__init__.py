"""Passes: FX graph rewrites that recognize the gated-delta pipeline and replace it with
graphdelta ops (see the compiler issue). Empty until the compiler lands."""
