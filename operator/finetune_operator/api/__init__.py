"""The FineTuneJob API: typed models and the CRD generated from them."""
