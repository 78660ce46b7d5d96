"""Reading features: ``features`` (top-activating windows, logit effects), ``concepts`` (concept F1),
``autointerp`` and ``judges`` (explain / detect with an explainer and a judge), ``dashboard`` (the static HTML
site), ``neuronpedia`` (export)."""
