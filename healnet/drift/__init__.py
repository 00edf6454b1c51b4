"""Input-drift monitoring without storing patient data (docs/drift.md).

`reference`: the training inputs' bins and counts, fitted at training and saved in the checkpoint.
`spool`: what the service keeps of its requests, counts per bin over windows of at least `MIN_WINDOW_CASES`
requests, in a bounded folder. `compare`: the tests of the spooled counts against the reference (scipy;
`healnet drift`, never the service). The first two use numpy only, so that serving imports them.
"""
