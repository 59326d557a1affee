"""cabs-streaming: Concept-Aware Batch Sampling for CLIP / SigLIP on the MosaicML stack."""

__version__ = "0.1.0"
