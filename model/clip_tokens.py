"""open_clip's BPE vocabulary, as the towers and the objectives see it: one definition of the
special ids (``tests/test_tokenizer_parity.py`` checks them against open_clip's tokenizer)."""

from typing import Final

PAD_ID: Final = 0
SOT_ID: Final = 49406  # <start_of_text>
EOT_ID: Final = 49407  # <end_of_text>: the text tower pools on it
VOCAB_SIZE: Final = 49408  # ids 0..49407
SPECIAL_IDS: Final = (PAD_ID, SOT_ID, EOT_ID)
