"""nstjax: neural style transfer (Gatys et al.) in JAX."""
