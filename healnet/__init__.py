"""HEALNet multimodal survival library."""
