"""Servicers of the circuits.v1 services: translate requests, delegate, translate back."""
