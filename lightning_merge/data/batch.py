"""Keys every data module's batches share."""

LABELS = "labels"
#: position of an example in its evaluation set's canonical order (file order, or the seeded subsample's),
#: so results gathered from several devices can drop the duplicates a distributed sampler pads with
EXAMPLE_INDEX = "example_index"
#: a masked LM's batches: the masked positions (B, M), -1 where unused; labels there, IGNORE where unused
MASKED_POSITIONS = "masked_positions"
IGNORE = -100
