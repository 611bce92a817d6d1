"""One module per selection method; `quadlib.selection.registry.SELECTORS` lists them by name."""
