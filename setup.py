"""pocketproxy: OpenVPN admission controller and transparent proxy through customers' phones."""

from setuptools import setup

setup(
    name="pocketproxy",
    version="0.1.0",
    description="OpenVPN management controller and per-client transparent proxy through device proxies",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["ovpnmgr", "proxy", "twisted.plugins"],
    package_dir={"twisted.plugins": "twistd-plugins"},
    install_requires=[
        "Twisted[tls]>=22.4",
        "service-identity>=18.1",
        "pyroute2>=0.7.2",
        "txaio>=21.2",
        "PyYAML>=6.0",
        "psycopg>=3.1",
    ],
    extras_require={"test": ["pytest", "pytest-twisted", "hypothesis"]},
    entry_points={"console_scripts": ["pocketproxyctl = ovpnmgr.ctl:main"]},
)
