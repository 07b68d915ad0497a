/** OHIF Viewer (npm @ohif/app, its dist/ served as static files) using pacs-node's DICOMweb.
 *
 * Copy over dist/app-config.js and replace NODE with the node's [web] URL (or its
 * web.public_url). The viewer's origin must be listed in the node's web.cors_origins, e.g.
 *   [web]
 *   cors_origins = ["https://viewer.example"]
 * With [[web.tokens]], give the viewer a token with search and retrieve through OHIF's
 * `requestOptions.auth` (below) or an authenticating reverse proxy.
 */
window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  defaultDataSourceName: 'pacs-node',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs-node',
      configuration: {
        friendlyName: 'pacs-node',
        name: 'pacs-node',
        wadoUriRoot: 'NODE/dicom-web',
        qidoRoot: 'NODE/dicom-web',
        wadoRoot: 'NODE/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
        // requestOptions: { auth: 'Bearer <token>' },
      },
    },
  ],
};
