"""nstjax: neural style transfer (Gatys et al.) in JAX.

    import nstjax
    result = nstjax.stylize("photo.jpg", "painting.jpg")            # nstjax.api.stylize
    grid = nstjax.sweep("photo.jpg", "painting.jpg", grid={"loss.beta": [1e3, 1e4]})
"""


def stylize(content, style, *overrides, preset="preview", **options):
    """:func:`nstjax.api.stylize` (imported when first called: ``import nstjax`` stays light)."""
    from nstjax import api

    return api.stylize(content, style, *overrides, preset=preset, **options)


def sweep(content, style, grid, *overrides, preset="preview", **options):
    """:func:`nstjax.api.sweep` (imported when first called)."""
    from nstjax import api

    return api.sweep(content, style, grid, *overrides, preset=preset, **options)
