"""Prepared data as the model sees it: read the folder, build the BIGRec prompt, batch token ids."""
