"""Backend implementations (one module per backend; see crossvit_kernels.backends)."""
