"""KFP v2 lightweight components of the HEALNet pipeline: thin wrappers around `healnet`.

Each step runs in the project image (`components.images`); its body imports `healnet` (and
`components.support`) inside the function, as KFP ships only the function's source.
"""
