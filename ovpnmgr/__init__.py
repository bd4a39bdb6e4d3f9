"""OpenVPN management-interface controller: admission, addresses, kernel rules."""
