"""Thin KFP components: each converts KFP inputs to a stage config + URIs and calls the stage."""
