"""The body of each pipeline stage, one module per stage: `explain_prune/<stage>.py` is its Hydra entry
point (`python -m explain_prune.<stage>`) and `explain_prune/stages/<stage>.py` does the work.

    generate  answer each sample, cache (A_v^0, R_v)           build_cache
    train     fit or validate f_θ on the cached pairs          run (fit, validate)
    evaluate  prune, answer, score and account a benchmark     evaluate, finalize
    report    a sweep's results.json files -> the paper tables main

Stages sit on top of the libraries (explain, compress, benchmarks, engine, methods, models, data,
report, core) and nothing below imports them (docs/design.md, Layering).
"""
