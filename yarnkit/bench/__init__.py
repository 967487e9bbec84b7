"""Checks and measurements of yarnkit on a real machine, at the end of the data flow (they import the stages, none
imports them):

    recipe_shapes  the small shape of each shipped recipe (the CPU recipe test and the GPU check train with it)
    gpu_paths      one GPU path each: trains, evaluates, exports or decodes, then checks what it wrote
    gpu_check      runs every GPU path in its own process within a time budget -> one JSON + a pass/fail table
"""
