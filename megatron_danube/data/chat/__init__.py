"""Chat data: records, the chat template, encoding, packing and preference pairs."""
