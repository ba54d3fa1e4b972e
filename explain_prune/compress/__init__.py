"""f_θ and its training: the compressors (`network.COMPRESSORS`), labels, the datamodule and the
LightningModule.  A compressor module other than network.py is imported here so it registers."""
