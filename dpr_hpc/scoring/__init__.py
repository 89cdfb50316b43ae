"""Retrieval scoring: DPR's answer matching, Acc@k and MRR, and TREC run files."""
