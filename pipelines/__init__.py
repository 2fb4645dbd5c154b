"""KFP pipelines composed from components/; compiled YAML is checked in under pipelines/compiled/."""
