"""Small plugin modules that tests register through real EntryPoint objects."""
