"""Reading features: ``features`` (top-activating windows, logit effects, masked-position statistics in one pass),
``concepts`` (the best latent per labelled concept, F1), ``autointerp`` and ``judges`` (explain / detect with an
explainer and a judge), ``report`` (the feature report's schema and its one validator), ``dashboard`` (the static
HTML site), ``neuronpedia`` (export)."""
