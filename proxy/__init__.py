"""Transparent proxy library; knows nothing of OpenVPN."""
