"""Speculative decoding with a recurrent drafter (ReDrafter)."""
