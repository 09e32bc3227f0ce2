"""One module per command, in pipeline order; each adds its own parser and names its function (`func`)."""

from . import (
    attribute,
    dissect,
    effects,
    evaluate,
    explain,
    export,
    recommender,
    record,
    report,
    run,
    serve,
    sites,
    steer,
    steer_compare,
    supervised,
    train,
)

MODULES = (run, sites, record, train, evaluate, explain, report, serve, export, steer, steer_compare, attribute,
           effects, supervised, dissect, recommender)
